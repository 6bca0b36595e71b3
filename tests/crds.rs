//! `chart/crds/` must hold exactly what `vm-dhcp crd` prints: regenerate with `make crds`.

use std::path::Path;
use std::process::Command;

#[test]
fn chart_crds_match_the_binary_output() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifests = vm_dhcp_core::crd::crd_manifests().expect("render CRDs");
    let mut expected_stream = Vec::new();
    for (name, yaml) in &manifests {
        let path = root.join("chart/crds").join(name);
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `make crds`", path.display()));
        assert!(
            on_disk == *yaml,
            "{} drifted from `vm-dhcp crd`; run `make crds` and commit the result",
            path.display()
        );
        expected_stream.push(yaml.clone());
    }
    let files = std::fs::read_dir(root.join("chart/crds"))
        .expect("chart/crds exists")
        .count();
    assert_eq!(
        files,
        manifests.len(),
        "chart/crds holds files `vm-dhcp crd` does not print"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_vm-dhcp"))
        .arg("crd")
        .output()
        .expect("run vm-dhcp crd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected_stream.join("---\n")
    );
}

#[test]
fn unknown_flag_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_vm-dhcp"))
        .args(["crd", "--bogus"])
        .output()
        .expect("run vm-dhcp");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--bogus"), "{err}");
}
