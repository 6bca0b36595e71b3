//! The binary's command line as an operator meets it: `--version`, `--log-format json`,
//! `VM_DHCP_<FLAG>` variables with the Go version's names as aliases, `--kubeconfig` and
//! `KUBECONFIG` with several paths.

use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_vm-dhcp");

fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("KUBECONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running vm-dhcp");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_names_the_release() {
    let (ok, out, _) = run(&["--version"], &[]);
    assert!(ok);
    assert_eq!(out.trim(), format!("vm-dhcp {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn json_logs_are_one_object_per_line() {
    // The offline agent fails on an interface that does not exist: the fatal error is a
    // JSON line like every other.
    let child = Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "agent",
            "--ippool-file",
            "/nonexistent/pool.yaml",
        ])
        .args(["--nic", "vmdhcp-absent0", "--http-addr", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("agent");
    std::thread::sleep(Duration::from_millis(800));
    // (If it was still running, it is stopped.)
    // SAFETY: plain syscall on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().expect("agent output");
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"ERROR\"") && l.contains("vmdhcp-absent0")),
        "{text}"
    );
}

#[test]
fn a_bad_log_format_is_refused_with_the_choices() {
    let (ok, _, err) = run(&["--log-format", "xml", "crd"], &[]);
    assert!(!ok);
    assert!(
        err.contains("xml") && err.contains("text") && err.contains("json"),
        "{err}"
    );
}

#[test]
fn variables_canonical_and_upstream() {
    // VM_DHCP_<FLAG> is read...
    let (ok, _, err) = run(&["webhook"], &[("VM_DHCP_HTTPS_PORT", "not-a-port")]);
    assert!(!ok);
    assert!(
        err.contains("not-a-port") && err.contains("--https-port"),
        "{err}"
    );
    // ... and so is the Go version's name, when the canonical one is unset.
    let (ok, _, err) = run(
        &["controller", "--agents-per-pool", "x"],
        &[("AGENT_IMAGE", "img")],
    );
    assert!(!ok && err.contains("--agents-per-pool"), "{err}");
    let (_, help, _) = run(
        &["controller", "--help"],
        &[("AGENT_IMAGE", "repo/agent:v9")],
    );
    assert!(help.contains("[env: AGENT_IMAGE=repo/agent:v9]"), "{help}");
    let (_, help, _) = run(
        &["controller", "--help"],
        &[("AGENT_IMAGE", "old"), ("VM_DHCP_IMAGE", "new")],
    );
    assert!(help.contains("[env: VM_DHCP_IMAGE=new]"), "{help}");
}

#[test]
fn several_kubeconfig_paths_name_the_file_that_is_missing() {
    let dir = std::env::temp_dir().join(format!("vm-dhcp-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let good = dir.join("good");
    std::fs::write(
        &good,
        "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n",
    )
    .expect("kubeconfig");
    let paths = format!("{}:{}", good.display(), dir.join("missing").display());
    let (ok, _, err) = run(&["controller", "--kubeconfig", &paths], &[]);
    assert!(!ok);
    assert!(err.contains("missing"), "{err}");
    // KUBECONFIG with several paths is the client's: a missing file is skipped as kubectl
    // does, and the merged (empty) config is refused for what it lacks.
    let (ok, _, err) = run(&["controller"], &[("KUBECONFIG", &paths)]);
    assert!(!ok);
    assert!(!err.contains("reading kubeconfig"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
