//! `wasi:http/outgoing-handler` under the tenant's outbound grants
//! (`allow-outbound`, `max-outbound`), as a raw-world guest's TCP sockets
//! are: a request goes out only to an address a grant names (a name only if
//! a grant names it, looked up by the host), each counted against the
//! instance's `max-outbound`; a refusal is `HTTP-request-denied`, logged
//! once per request and counted. The host connects to the address it
//! checked, itself (so a second lookup cannot lead elsewhere), and speaks
//! HTTP/1.1 over it with hyper. Plain `http` only: an `https` request is
//! refused, and the log says why.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::wasm::outbound::Network;

/// How long a connect may take unless the guest's request options say.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the response's head may take unless the request options say.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);

/// A boxed future, as [`WasiHttpHooks::send_request`] returns it.
type Boxed<T> = Box<dyn std::future::Future<Output = T> + Send>;

/// One request's outgoing HTTP: its connection's [`Network`].
pub(crate) struct Outgoing {
    network: Arc<Network>,
}

impl Outgoing {
    pub(crate) fn new(network: Arc<Network>) -> Outgoing {
        Outgoing { network }
    }
}

impl WasiHttpHooks for Outgoing {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _io: Boxed<Result<(), HttpError>>,
    ) -> Boxed<Result<(http::Response<WasiBody>, Boxed<Result<(), HttpError>>), HttpError>> {
        let network = self.network.clone();
        Box::new(async move { send(&network, request, options).await })
    }
}

/// What a failed lookup of the request's host is.
fn dns_error() -> HttpError {
    HttpError::DnsError {
        rcode: None,
        info_code: None,
    }
}

/// Checks, connects and sends `request`.
async fn send(
    network: &Network,
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> Result<(http::Response<WasiBody>, Boxed<Result<(), HttpError>>), HttpError> {
    let uri = request.uri().clone();
    let shown = crate::logging::escape(&uri.to_string()).into_owned();
    if !network.granted() {
        network.refuse_http(&shown, "the tenant grants no outbound network");
        return Err(HttpError::HttpRequestDenied);
    }
    if uri.scheme() != Some(&Scheme::HTTP) {
        network.refuse_http(&shown, "only plain http:// requests can be sent");
        return Err(HttpError::HttpRequestDenied);
    }
    let authority = uri
        .authority()
        .ok_or(HttpError::HttpRequestUriInvalid)?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let candidates: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) if network.may_resolve(host) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|_| dns_error())?
            .collect(),
        Err(_) => return Err(HttpError::HttpRequestDenied),
    };
    if candidates.is_empty() {
        return Err(dns_error());
    }
    let Some(addr) = network.http_target(&shown, &candidates) else {
        return Err(HttpError::HttpRequestDenied);
    };

    let connect_timeout = options
        .and_then(|o| o.connect_timeout)
        .unwrap_or(CONNECT_TIMEOUT);
    let first_byte_timeout = options
        .and_then(|o| o.first_byte_timeout)
        .unwrap_or(FIRST_BYTE_TIMEOUT);
    let stream = tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| HttpError::ConnectionTimeout)?
        .map_err(HttpError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = tokio::time::timeout(
        connect_timeout,
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| HttpError::ConnectionTimeout)??;

    // The request line names only the path (origin form); `Host` names
    // the authority without any userinfo (the guest cannot set `Host`).
    let host_header = match authority.port() {
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_string(),
    };
    let host_header =
        http::HeaderValue::from_str(&host_header).map_err(|_| HttpError::HttpRequestUriInvalid)?;
    request
        .headers_mut()
        .insert(http::header::HOST, host_header);
    let target = match uri.path_and_query().map(|p| p.as_str()) {
        Some(p) if p.starts_with('/') => p.to_string(),
        Some(p) => format!("/{p}"),
        None => "/".to_string(),
    };
    *request.uri_mut() = target
        .parse()
        .map_err(|_| HttpError::HttpRequestUriInvalid)?;

    // Drive the connection while waiting for the response's head.
    let mut connection = Box::pin(connection);
    let mut connection_done = false;
    let response = {
        let sending = tokio::time::timeout(first_byte_timeout, sender.send_request(request));
        tokio::pin!(sending);
        loop {
            tokio::select! {
                biased;
                sent = &mut sending => {
                    break sent.map_err(|_| HttpError::ConnectionReadTimeout)??;
                }
                ended = &mut connection, if !connection_done => {
                    connection_done = true;
                    ended?;
                }
            }
        }
    };
    let response = response.map(|body| body.map_err(HttpError::from).boxed_unsync());
    // What is left of the connection (the response body) runs as the
    // guest reads it.
    let rest: Boxed<Result<(), HttpError>> = Box::new(async move {
        if !connection_done {
            connection.await?;
        }
        Ok(())
    });
    Ok((response, rest))
}
