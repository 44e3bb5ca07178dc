//! The deployment files pass `scripts/check_deploy.sh`, offline: the Helm chart renders
//! (Helm's own engine, no `helm` binary) with its default, GPU and multi-shard values,
//! every rendered object validates against the Kubernetes schemas (the ServiceMonitor
//! against a committed schema, as kubernetes-validate has none for custom resources),
//! the chart refuses inconsistent values, and the dashboard, the Prometheus config and
//! rules (promtool), the compose files and the Dockerfiles check out. The first run
//! installs the pinned tools into .deps/ (see the script).

mod common;

use std::process::Command;

#[test]
fn deployment_files_pass_the_offline_checks() {
    let root = common::repo_root();
    let output = Command::new(root.join("scripts/check_deploy.sh"))
        .current_dir(&root)
        .output()
        .expect("running scripts/check_deploy.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "scripts/check_deploy.sh failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // The script checked what it is meant to check, not less.
    for check in [
        "ok   chart render (default values)",
        "ok   chart render (ci/gpu-values.yaml)",
        "ok   chart render (ci/multishard-values.yaml)",
        "ok   chart objects validate against Kubernetes",
        "ServiceMonitor against its own (ci/gpu-values.yaml)",
        "ok   chart objects fit together and follow the values (ci/multishard-values.yaml)",
        "ok   every template is rendered by some values set",
        "ok   chart refuses",
        "ok   dashboard JSON is what make_dashboard.py writes",
        "ok   promtool check config",
        "ok   promtool check rules",
        "ok   docker-compose.yml",
        "ok   Dockerfile.cpu",
        "ok   Dockerfile.cuda",
        "check_deploy: all ",
    ] {
        assert!(
            stdout.contains(check),
            "`{check}` missing from the output:\n{stdout}\n{stderr}"
        );
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
}
