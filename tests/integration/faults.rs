//! Faults found by trying to break the host (issue 12), each pinned by the
//! scenario that found it.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::support::{guest, Server, TempDir, PATIENCE};

// ---------------------------------------------------------------------------
// Forged log lines (#3): whatever a client or a guest controls is one line.

/// What the client's path and the guest's output try to slip into the log.
const FORGED: &str = "INFO connection 999 closed peer=10.6.6.6:1 tenant=admin outcome=ok";

/// Serves the test guest on a Unix socket, connects from a client socket
/// bound to a path holding a newline and a forged log line, and asks the
/// guest to print and return text full of control characters. Returns the
/// host's log.
fn forge_log_lines(format: &str) -> Vec<String> {
    let dir = TempDir::new("forge");
    let sock = dir.path().join("h.sock");
    let args: Vec<std::ffi::OsString> = vec![
        "serve".into(),
        "--addr".into(),
        format!("unix:{}", sock.display()).into(),
        "--handler".into(),
        guest("test-guest").into(),
        "--log-format".into(),
        format.into(),
    ];
    let server = Server::spawn(&args, &[]);
    server.wait_for_log(|l| l.contains("listening on unix:"));

    // A client may bind its own socket to any path it can create.
    let client_path = dir.path().join(format!("c\n{FORGED}"));
    let client = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    client.bind(&SockAddr::unix(&client_path).unwrap()).unwrap();
    client.connect(&SockAddr::unix(&sock).unwrap()).unwrap();
    let mut client = UnixStream::from(std::os::fd::OwnedFd::from(client));
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    // A newline, a carriage return, ESC, DEL and C1 (NEL, U+0085, in UTF-8).
    let text = "x%0AINFO connection 998 closed peer=10.6.6.7:1 outcome=ok\
                %0DINFO connection 997 closed%1B[2J%7F%C2%85INFO connection 996%09end";
    client
        .write_all(format!("forge {text}\n").as_bytes())
        .unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    let _ = client.read_to_end(&mut reply);
    server.wait_for_log(|l| l.contains(" closed ") && l.contains("handler-error"));
    server.log()
}

/// Every line of the log: no control character (JSON: none that JSON must
/// escape), and no line that is the forged one.
fn assert_no_forged_line(log: &[String], json: bool) {
    let all = log.join("\n");
    let forbidden = |c: char| match json {
        false => c.is_control(),
        true => c < ' ',
    };
    for line in log {
        assert!(
            !line.chars().any(forbidden),
            "a log line holds a control character: {line:?}\nthe log:\n{all}"
        );
        assert!(
            !line.starts_with("INFO connection 99"),
            "a forged log line: {line:?}\nthe log:\n{all}"
        );
    }
}

#[test]
fn a_text_log_line_cannot_be_forged() {
    let log = forge_log_lines("text");
    assert_no_forged_line(&log, false);
    let all = log.join("\n");
    // The values are there, escaped.
    let closed = log
        .iter()
        .find(|l| l.contains(" closed peer=unix:"))
        .unwrap_or_else(|| panic!("no closed line:\n{all}"));
    assert!(
        closed.contains(&format!("/c\\n{FORGED} worker=")),
        "the peer path is not escaped: {closed}"
    );
    assert!(
        closed.contains("\\n") && closed.contains("handler-error error=\"x\\n"),
        "the guest's error is not escaped: {closed}"
    );
    for stream in ["stdout", "stderr"] {
        let marker = format!(" {stream}: INFO connection 998 closed peer=10.6.6.7:1 outcome=ok\\rINFO connection 997 closed\\u{{1b}}[2J\\u{{7f}}\\u{{85}}INFO connection 996\\tend");
        assert!(
            log.iter().any(|l| l.ends_with(&marker)),
            "no escaped {stream} line ending {marker:?}:\n{all}"
        );
    }
}

#[test]
fn a_json_log_line_cannot_be_forged() {
    let log = forge_log_lines("json");
    assert_no_forged_line(&log, true);
    let mut peers = Vec::new();
    for line in &log {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        let message = event["fields"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.starts_with("INFO connection 99"),
            "a forged event: {line}"
        );
        if let Some(peer) = event["fields"]["peer"].as_str() {
            peers.push(peer.to_string());
        }
    }
    assert!(
        peers.iter().any(|p| p.ends_with(&format!("/c\\n{FORGED}"))),
        "no event has the client's path as its peer, escaped: {peers:?}"
    );
}
