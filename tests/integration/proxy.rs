//! The PROXY protocol (issue 14, part 1): hosts behind a real HAProxy
//! (`docs/haproxy.cfg`, v2 to two hosts, v1 to a third) serve the guest the
//! client's address and judge allow/deny on it; headers written by hand
//! check every kind of header on every strategy, a balancer slow to send
//! its header holding up no one, bad headers refused as `bad-proxy-header`,
//! and a forged header from outside `proxy-from` refused.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::{Launch, Process};

use crate::for_each_strategy;
use crate::support::{
    connect, connect_from, eventually, fields, guest, run_host, run_host_in, send_and_read, Load,
    Server, Strategy, TempDir, LOAD_CLIENTS, PATIENCE,
};

for_each_strategy!(
    a_balancers_header_names_the_client,
    bad_and_forged_headers_are_refused,
);

// ---------------------------------------------------------------------------
// Headers and clients.

/// A v2 `PROXY` header for a TCP connection from `src` to `dst`.
fn v2_proxy(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            0x11
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            0x21
        }
        _ => panic!("one family"),
    };
    body.extend_from_slice(&src.port().to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());
    v2(0x21, family, &body)
}

/// A v2 `LOCAL` header (a balancer's health check), as HAProxy sends it.
fn v2_local() -> Vec<u8> {
    v2(0x20, 0x00, &[])
}

fn v2(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.push(version_command);
    out.push(family);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Sends `data` on `stream`, half-closes, reads the reply; returns the
/// reply and the address the connection came from.
fn ask(stream: TcpStream, data: &[u8]) -> (String, SocketAddr) {
    let from = stream.local_addr().unwrap();
    let reply = send_and_read(stream, data);
    (String::from_utf8_lossy(&reply).into_owned(), from)
}

/// The `closed` line of the connection whose `peer=` is `peer`, from one
/// of `servers`.
fn closed_line(servers: &[&Server], peer: &str) -> String {
    let marker = format!(" peer={peer} ");
    eventually(PATIENCE, || {
        for server in servers {
            if let Some(line) = server
                .log()
                .into_iter()
                .find(|l| l.contains(" closed ") && l.contains(&marker))
            {
                return Ok(line);
            }
        }
        Err(format!("no closed line with{marker}"))
    })
}

fn info(reply: &str) -> HashMap<String, String> {
    fields(reply)
}

// ---------------------------------------------------------------------------
// Headers by hand, on every strategy.

/// A balancer (127.0.0.1 here) sends v1 and v2 headers over IPv4 and IPv6,
/// and `LOCAL`: the guest and the log see the client the header names (or
/// the balancer, for `LOCAL`), the log names the balancer, and a deny rule
/// on the named client refuses it. Meanwhile another balancer connection
/// has sent half a header and waits: it holds up no one, and ends as
/// `bad-proxy-header` when what it sends is no header.
fn a_balancers_header_names_the_client(strategy: Strategy) {
    let server = Server::start(
        strategy,
        Some(&guest("test-guest")),
        &[
            "--proxy-protocol",
            "any",
            "--proxy-from",
            "127.0.0.1/32",
            "--proxy-header-timeout",
            "60s",
            "--deny",
            "10.0.0.9/32",
        ],
    );
    let addr = server.addr();
    let mut held = connect(addr);
    held.write_all(b"PROXY TCP4 ").unwrap();
    let held_from = held.local_addr().unwrap();

    let client: SocketAddr = "192.0.2.7:56324".parse().unwrap();
    let mut header = v2_proxy(client, addr);
    header.extend_from_slice(b"info\n");
    let (reply, balancer) = ask(connect(addr), &header);
    assert_eq!(info(&reply)["peer-address"], "192.0.2.7:56324", "{reply}");
    let line = closed_line(&[&server], "192.0.2.7:56324");
    assert!(line.contains(&format!(" via={balancer} ")), "{line}");
    assert!(line.ends_with("outcome=ok"), "{line}");

    let client6 = SocketAddr::new("2001:db8::7".parse::<Ipv6Addr>().unwrap().into(), 40000);
    let dst6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 7000);
    let mut header = v2_proxy(client6, dst6);
    header.extend_from_slice(b"info\n");
    let (reply, _) = ask(connect(addr), &header);
    assert_eq!(
        info(&reply)["peer-address"],
        "[2001:db8::7]:40000",
        "{reply}"
    );

    let (reply, balancer) = ask(
        connect(addr),
        b"PROXY TCP6 2001:db8::8 ::1 40001 7000\r\ninfo\n",
    );
    assert_eq!(
        info(&reply)["peer-address"],
        "[2001:db8::8]:40001",
        "{reply}"
    );
    let line = closed_line(&[&server], "[2001:db8::8]:40001");
    assert!(line.contains(&format!(" via={balancer} ")), "{line}");

    // A health check: the balancer's own connection, served as such.
    let mut header = v2_local();
    header.extend_from_slice(b"info\n");
    let (reply, balancer) = ask(connect(addr), &header);
    assert_eq!(
        info(&reply)["peer-address"],
        balancer.to_string(),
        "{reply}"
    );
    let (reply, balancer) = ask(connect(addr), b"PROXY UNKNOWN\r\ninfo\n");
    assert_eq!(
        info(&reply)["peer-address"],
        balancer.to_string(),
        "{reply}"
    );

    // Deny judges the client the header names, not the balancer.
    let (reply, balancer) = ask(
        connect(addr),
        b"PROXY TCP4 10.0.0.9 127.0.0.1 1000 7000\r\ninfo\n",
    );
    assert_eq!(reply, "", "a denied client is served nothing");
    let line = closed_line(&[&server], "10.0.0.9:1000");
    assert!(line.contains(&format!(" via={balancer} ")), "{line}");
    assert!(line.ends_with("outcome=denied"), "{line}");
    assert!(!line.contains("worker=acceptor"), "{line}");

    // The slow balancer was waiting all along; what it sends now is no
    // header.
    let (reply, _) = ask(held, b"192.0.2.7 garbage\r\ninfo\n");
    assert_eq!(reply, "");
    let line = closed_line(&[&server], &held_from.to_string());
    assert!(
        line.contains("outcome=bad-proxy-header error=\"a malformed v1 header: not four fields"),
        "{line}"
    );
    assert!(!line.contains(" via="), "{line}");
}

/// With `proxy-header-timeout` and `[metrics]` from a config file: a slow
/// header, a v2 header to a v1 tenant, and a connection that is no header
/// at all end as `bad-proxy-header` (logged and counted), running no guest.
/// A client outside `proxy-from` that forges a header (v1 or v2) is
/// refused as `bad-proxy-header` under its own address, while its plain
/// data is served; and if its own address is denied, it is refused,
/// whatever its header claims.
fn bad_and_forged_headers_are_refused(strategy: Strategy) {
    let toml = format!(
        r#"
[metrics]
addr = "127.0.0.1:0"

[tenants.edge]
listen = ["127.0.0.1:0"]
strategy = "{}"
proxy-protocol = "v1"
proxy-from = ["127.0.0.1/32"]
proxy-header-timeout = "300ms"
deny = ["127.0.0.7/32"]
"#,
        strategy.name()
    );
    let config = Server::start_config(&toml, &[]);
    let addr = config.addr("edge");
    let server: &Server = &config;
    let serving = server.wait_for_log(|l| l.contains("tenant edge: serving"));
    assert!(
        serving.ends_with(
            "; allow [], deny [\"127.0.0.7/32\"]; proxy protocol v1 from [\"127.0.0.1/32\"], header timeout 300ms"
        ),
        "{serving}"
    );

    let mut slow = connect(addr);
    slow.write_all(b"PROXY TCP4 192.0.2.7").unwrap();
    let slow_from = slow.local_addr().unwrap();
    let line = closed_line(&[server], &slow_from.to_string());
    assert!(
        line.ends_with(
            "outcome=bad-proxy-header error=\"no whole PROXY protocol header within 300ms (20 bytes)\""
        ),
        "{line}"
    );
    drop(slow);

    let mut header = v2_proxy("192.0.2.7:1".parse().unwrap(), addr);
    header.extend_from_slice(b"hello");
    let (reply, from) = ask(connect(addr), &header);
    assert_eq!(reply, "");
    let line = closed_line(&[server], &from.to_string());
    assert!(
        line.ends_with(
            "outcome=bad-proxy-header error=\"a PROXY protocol v2 header, but the tenant takes v1\""
        ),
        "{line}"
    );

    let (reply, from) = ask(connect(addr), b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(reply, "");
    let line = closed_line(&[server], &from.to_string());
    assert!(
        line.ends_with("outcome=bad-proxy-header error=\"not a PROXY protocol header\""),
        "{line}"
    );

    // Not a balancer: a header is refused, as the peer who connected,
    // before any guest runs (v1 and v2 signatures alike).
    let forged = b"PROXY TCP4 10.1.2.3 127.0.0.1 1 2\r\nhello";
    let (reply, from) = ask(connect_from(addr, 8).unwrap(), forged);
    assert_eq!(reply, "");
    let line = closed_line(&[server], &from.to_string());
    assert!(!line.contains(" via="), "{line}");
    assert!(
        line.ends_with(
            "outcome=bad-proxy-header error=\"a PROXY protocol v1 header from a peer outside proxy-from\""
        ),
        "{line}"
    );
    let mut forged = v2_proxy("10.1.2.3:1".parse().unwrap(), addr);
    forged.extend_from_slice(b"hello");
    let (reply, from) = ask(connect_from(addr, 8).unwrap(), &forged);
    assert_eq!(reply, "");
    let line = closed_line(&[server], &from.to_string());
    assert!(
        line.ends_with(
            "outcome=bad-proxy-header error=\"a PROXY protocol v2 header from a peer outside proxy-from\""
        ),
        "{line}"
    );
    // And its plain data is served, at once, as from the peer itself.
    let (reply, from) = ask(connect_from(addr, 8).unwrap(), b"PROXIMITY hello");
    assert_eq!(reply, "PROXIMITY hello");
    let line = closed_line(&[server], &from.to_string());
    assert!(!line.contains(" via="), "{line}");
    assert!(line.ends_with("outcome=ok"), "{line}");

    // Not a balancer, and denied: refused at once, whatever it claims.
    let forged = b"PROXY TCP4 127.0.0.8 127.0.0.1 1 2\r\nhello";
    let (reply, from) = ask(connect_from(addr, 7).unwrap(), forged);
    assert_eq!(reply, "");
    let line = closed_line(&[server], &from.to_string());
    assert!(line.contains(" worker=acceptor "), "{line}");
    assert!(line.ends_with("outcome=denied"), "{line}");

    let page = config.metrics();
    for (outcome, count) in [("bad-proxy-header", 5), ("denied", 1), ("ok", 1)] {
        let series =
            format!("host_connections_total{{tenant=\"edge\",outcome=\"{outcome}\"}} {count}");
        assert!(page.lines().any(|l| l == series), "{series} in:\n{page}");
    }
}

// ---------------------------------------------------------------------------
// Settings.

#[test]
fn proxy_protocol_without_proxy_from_refuses_to_start() {
    let out = run_host(&["serve", "--addr", "127.0.0.1:0", "--proxy-protocol", "v2"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "error: tenant \"default\": --proxy-protocol needs --proxy-from: the networks of the \
         balancers that send the header (e.g. --proxy-from 10.0.0.0/8)"
    );
}

#[test]
fn config_check_shows_the_proxy_settings_only_where_set() {
    let dir = TempDir::new("proxy-check");
    let toml = r#"
[tenants.edge]
listen = ["127.0.0.1:0"]
proxy-protocol = "any"
proxy-from = ["10.0.0.0/8", "192.0.2.7"]

[tenants.inner]
listen = ["127.0.0.1:0"]
"#;
    std::fs::write(dir.path().join("host.toml"), toml).unwrap();
    let out = run_host_in(dir.path(), &["config", "check", "host.toml", "--no-cache"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (edge, inner) = stdout.split_once("[tenants.inner]").expect("both tenants");
    assert!(
        edge.contains(
            "proxy-protocol = \"any\"\nproxy-from = [\"10.0.0.0/8\", \"192.0.2.7/32\"]\nproxy-header-timeout = \"3s\"\n"
        ),
        "{stdout}"
    );
    assert!(!inner.contains("proxy"), "{stdout}");
}

// ---------------------------------------------------------------------------
// Behind a real HAProxy.

/// HAProxy's binary, or `None` (said out loud) when it is not installed
/// and the run is not CI's; under CI (`CI` set) its absence fails the test.
fn haproxy_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Debian installs it in /usr/sbin, which a user's PATH may lack.
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|bin| bin.is_file());
    if found.is_none() {
        let why = "haproxy is not installed (Debian package haproxy; \
                   handlers/install-toolchains.sh haproxy installs it)";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("SKIPPED: {why}");
    }
    found
}

/// A free TCP port on 127.0.0.1 (free when asked).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// HAProxy running `docs/haproxy.cfg` in the foreground, killed when
/// dropped.
fn start_haproxy(bin: &Path, env: &[(&str, String)]) -> Process {
    let config = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("docs/haproxy.cfg");
    let mut command = Command::new(bin);
    command.arg("-f").arg(&config).arg("-db");
    for (name, value) in env {
        command.env(name, value);
    }
    let mut process = Launch::new(command)
        .own_group()
        .spawn()
        .expect("cannot start haproxy");
    // Ready once its frontends accept (a probe's connection reaches a host
    // as an empty one: harmless).
    for (name, addr) in env.iter().filter(|(name, _)| name.starts_with("FRONT")) {
        eventually(PATIENCE, || {
            if let Ok(Some(status)) = process.try_wait() {
                panic!("haproxy exited ({status}):\n{}", process.log().join("\n"));
            }
            TcpStream::connect(addr.as_str()).map_err(|e| format!("{name} {addr}: {e}"))
        });
    }
    process
}

/// docs/haproxy.cfg's environment: its two frontends, and each host's
/// address and health-check port (its metrics port).
fn haproxy_env(
    front_v2: SocketAddr,
    front_v1: SocketAddr,
    hosts: [&Server; 3],
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("FRONT_V2", front_v2.to_string()),
        ("FRONT_V1", front_v1.to_string()),
    ];
    for (i, host) in hosts.iter().enumerate() {
        let [addr, check] = [
            ["HOST1", "HOST1_CHECK_PORT"],
            ["HOST2", "HOST2_CHECK_PORT"],
            ["HOST3", "HOST3_CHECK_PORT"],
        ][i];
        env.push((addr, host.addr().to_string()));
        env.push((check, host.metrics_addr().port().to_string()));
    }
    env
}

/// Two hosts behind one HAProxy frontend that sends v2 headers (threading
/// and async), a third behind one that sends v1 (forking): the guest sees
/// the client's own address (127.0.0.7 and its port), the log names the
/// balancer, and a deny rule on a client's address (127.0.0.9) refuses it
/// through the balancer while 127.0.0.7 is served.
#[test]
fn behind_haproxy_the_guest_sees_the_client_and_deny_judges_it() {
    let Some(bin) = haproxy_binary() else {
        return;
    };
    let test_guest = guest("test-guest");
    let host = |strategy, version| {
        Server::start(
            strategy,
            Some(&test_guest),
            &[
                "--proxy-protocol",
                version,
                "--proxy-from",
                "127.0.0.1/32",
                "--deny",
                "127.0.0.9/32",
                "--metrics-addr",
                "127.0.0.1:0",
            ],
        )
    };
    let host1 = host(Strategy::Threading, "v2");
    let host2 = host(Strategy::Async, "any");
    let host3 = host(Strategy::Forking, "v1");
    let (front_v2, front_v1) = (free_port(), free_port());
    let _haproxy = start_haproxy(
        &bin,
        &haproxy_env(front_v2, front_v1, [&host1, &host2, &host3]),
    );
    let v2_hosts = [&host1, &host2];

    // Round robin: four connections reach both v2 hosts.
    let mut reached = Vec::new();
    for front in [front_v2, front_v2, front_v2, front_v2, front_v1] {
        let (reply, client) = ask(connect_from(front, 7).unwrap(), b"info\n");
        assert_eq!(info(&reply)["peer-address"], client.to_string(), "{reply}");
        let line = closed_line(&[&host1, &host2, &host3], &client.to_string());
        assert!(line.contains(" via=127.0.0.1:"), "{line}");
        assert!(line.ends_with("outcome=ok"), "{line}");
        let marker = format!(" peer={client} ");
        let which = [&host1, &host2, &host3]
            .iter()
            .position(|h| h.log().iter().any(|l| l.contains(&marker)))
            .unwrap();
        reached.push(which);
    }
    assert!(
        reached[..4].contains(&0) && reached[..4].contains(&1),
        "{reached:?}"
    );
    assert_eq!(reached[4], 2, "{reached:?}");

    for (front, hosts) in [(front_v2, &v2_hosts[..]), (front_v1, &[&host3][..])] {
        let (reply, client) = ask(connect_from(front, 9).unwrap(), b"info\n");
        assert_eq!(reply, "", "a denied client is served nothing");
        let line = closed_line(hosts, &client.to_string());
        assert!(line.contains(" via=127.0.0.1:"), "{line}");
        assert!(line.ends_with("outcome=denied"), "{line}");
        // And 127.0.0.8 is served through the same frontend.
        let (reply, client) = ask(connect_from(front, 8).unwrap(), b"info\n");
        assert_eq!(info(&reply)["peer-address"], client.to_string(), "{reply}");
    }
}

/// HAProxy's health check (`option httpchk GET /readyz` in
/// docs/haproxy.cfg): a host that starts to drain (SIGTERM, with
/// `--shutdown-delay`) answers 503, HAProxy takes it out of rotation while
/// it still accepts, and the clients going through the balancer meanwhile
/// (short connections without pause) see no error; the drained host exits
/// by itself, and the other serves on.
#[test]
fn draining_a_host_takes_it_out_of_rotation_with_no_client_error() {
    let Some(bin) = haproxy_binary() else {
        return;
    };
    let host = |version| {
        Server::start(
            Strategy::Threading,
            None,
            &[
                "--proxy-protocol",
                version,
                "--proxy-from",
                "127.0.0.1/32",
                "--metrics-addr",
                "127.0.0.1:0",
                // Far longer than HAProxy needs to see the 503 (checks
                // every 100 ms here): the test waits for HAProxy's own line.
                "--shutdown-delay",
                "5s",
            ],
        )
    };
    let mut host1 = host("v2");
    let host2 = host("v2");
    let host3 = host("v1");
    let (front_v2, front_v1) = (free_port(), free_port());
    let mut env = haproxy_env(front_v2, front_v1, [&host1, &host2, &host3]);
    env.push(("CHECK_INTER", "100ms".to_string()));
    let haproxy = start_haproxy(&bin, &env);

    let load = Load::start(front_v2);
    load.wait_for_more(20);
    let served_by = |host: &Server| {
        host.log()
            .iter()
            .filter(|l| l.contains(" closed peer=") && l.contains(" via=127.0.0.1:"))
            .count()
    };
    assert!(
        served_by(&host1) > 0 && served_by(&host2) > 0,
        "round robin reaches both"
    );

    host1.signal(libc::SIGTERM);
    host1.wait_for_log(|l| l.contains("/readyz answers 503; still accepting for 5s"));
    let down = haproxy
        .wait_for_line(0, PATIENCE, |l| l.contains("Server hosts_v2/host1 is DOWN"))
        .unwrap_or_else(|missing| panic!("{}", missing.why("haproxy")));
    assert!(down.contains("503"), "{down}");
    // From now on HAProxy sends every client to host2; host1 still
    // accepts, then drains and exits.
    let (on_host1, on_host2) = (served_by(&host1), served_by(&host2));
    load.wait_for_more(50);
    // Each of those 50 has its `closed` line in a moment. Only connections
    // already on their way to host1 when it went down may have reached it:
    // one per client, and one more per client whose line host1 had not yet
    // written when it was counted.
    let (to_host1, to_host2) = eventually(PATIENCE, || {
        let (h1, h2) = (served_by(&host1) - on_host1, served_by(&host2) - on_host2);
        if h1 + h2 >= 50 {
            Ok((h1, h2))
        } else {
            Err(format!("{h1} + {h2} of 50 closed lines logged"))
        }
    });
    assert!(
        to_host1 <= 2 * LOAD_CLIENTS,
        "host1 took {to_host1} connections after it went down (host2 {to_host2})"
    );
    assert!(host1.wait_exit().success(), "{:#?}", host1.log());
    load.wait_for_more(20);
    let (served, failures) = load.finish();
    assert_eq!(failures, Vec::<String>::new(), "after {served} served");
}
