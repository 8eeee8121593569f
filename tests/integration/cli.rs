//! The command line itself: help and version.

use crate::support::run_host;

#[test]
fn help_lists_the_commands() {
    let out = run_host(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("serve"), "{text}");
}

#[test]
fn serve_help_lists_every_flag() {
    let out = run_host(&["serve", "--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--handler",
        "--addr",
        "--strategy",
        "--workers",
        "--max-children",
        "127.0.0.1:7878",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
}

#[test]
fn no_command_is_a_usage_error() {
    let out = run_host(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
}
