//! What a test needs from the machine, checked before it starts: root (network namespaces)
//! and programs from Debian packages (`ip`, `dhclient`, `busybox`). A test that cannot run
//! fails and names what is missing and how to get it (`scripts/test-deps.sh` installs the
//! packages), instead of passing without having run or timing out half-way ("gave up
//! waiting for client event BOUND"). Where skipping is wanted (a developer's machine without
//! root), `VM_DHCP_TESTS_SKIP_MISSING=1` turns each such failure into a printed SKIPPED.
//!
//! Included with `#[path]` by the test crates that need it (tests/agent_netns.rs and the
//! e2e tests).

use std::path::PathBuf;

/// The environment variable that turns "cannot run here" from a failure into a skip.
pub const SKIP_MISSING: &str = "VM_DHCP_TESTS_SKIP_MISSING";

/// A program the test runs, and the Debian package that has it.
pub struct Program {
    pub name: &'static str,
    pub package: &'static str,
}

pub const IP: Program = Program {
    name: "ip",
    package: "iproute2",
};
pub const DHCLIENT: Program = Program {
    name: "dhclient",
    package: "isc-dhcp-client",
};
pub const BUSYBOX: Program = Program {
    name: "busybox",
    package: "busybox",
};

/// `program` on PATH, where the tests run it from (Debian puts dhclient and ip in /usr/sbin
/// and /sbin: a PATH without them does not do).
pub fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// What is missing for a test that needs `root` and `programs`, in words.
pub fn missing(root: bool, programs: &[Program]) -> Option<String> {
    let mut what = Vec::new();
    if root && !is_root() {
        what.push("root (it makes network namespaces: run the tests as root)".to_string());
    }
    let absent: Vec<&Program> = programs.iter().filter(|p| find(p.name).is_none()).collect();
    if !absent.is_empty() {
        let names: Vec<String> = absent
            .iter()
            .map(|p| format!("`{}` (Debian package {})", p.name, p.package))
            .collect();
        let packages: Vec<&str> = absent.iter().map(|p| p.package).collect();
        what.push(format!(
            "{} (scripts/test-deps.sh installs it, or: apt-get install {})",
            names.join(", "),
            packages.join(" ")
        ));
    }
    (!what.is_empty()).then(|| what.join("; and "))
}

/// Whether `test` can run here. When it cannot: panics with what is missing, or, with
/// `VM_DHCP_TESTS_SKIP_MISSING=1`, prints SKIPPED and returns false.
pub fn require(test: &str, root: bool, programs: &[Program]) -> bool {
    let Some(what) = missing(root, programs) else {
        return true;
    };
    // libtest names each test's thread after the test.
    let thread = std::thread::current();
    let test = match thread.name() {
        Some(name) if name != "main" => format!("{test}::{name}"),
        _ => test.to_string(),
    };
    if std::env::var(SKIP_MISSING).is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: needs {what}");
        return false;
    }
    panic!("{test} cannot run here: it needs {what}. ({SKIP_MISSING}=1 skips such tests instead.)");
}
