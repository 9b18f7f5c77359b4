//! What a new user meets in the first hour (issue 14, item 6): the agent started with
//! `ip netns exec`, which mounts a fresh /sys without the BPF filesystem or the
//! cgroup mounts; logs written to a file; durations in logs.
use std::process::Command;

use kpr_lab::{
    lab::agent_binary,
    netns::Netns,
    scenario::{examples_dir, lab_without_agent},
};

/// `kpr run` under `ip netns exec` with `args`: its exit status and stderr.
fn run_under_ip_netns_exec(args: &[&str]) -> (bool, String) {
    let netns = Netns::create(&format!("{}-fr", kpr_lab::netns::unique_prefix())).expect("netns");
    let kpr = agent_binary().expect("kpr binary");
    let output = Command::new("ip")
        .args(["netns", "exec", netns.name()])
        .arg(&kpr)
        .args(["run", "--manifests"])
        .arg(examples_dir())
        .args([
            "--node-name",
            "node-a",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
        ])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running kpr");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_default_bpffs_under_ip_netns_exec_says_what_hides_it() {
    let (ok, stderr) = run_under_ip_netns_exec(&[]);
    assert!(!ok, "{stderr}");
    // Not the bare "No such file or directory" of mkdir in a sysfs.
    assert!(
        stderr.contains("/sys/fs/bpf is a sysfs with no BPF filesystem on it")
            && stderr.contains("`ip netns exec` mounts a fresh /sys")
            && stderr.contains("nsenter --net="),
        "{stderr}"
    );
}

#[test]
fn a_cgroup_path_under_ip_netns_exec_says_what_hides_it() {
    // A bpffs of the test's own, so the cgroup check is what fails.
    let lab = lab_without_agent(&examples_dir()).expect("lab");
    let pins = lab.pin_dir();
    let (ok, stderr) = run_under_ip_netns_exec(&[
        "--bpffs",
        &pins.display().to_string(),
        "--cgroup-path",
        "/sys/fs/cgroup",
    ]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("/sys/fs/cgroup is on a sysfs without cgroup mounts")
            && stderr
                .contains("no cgroup2 filesystem is mounted here (looked in /proc/self/mountinfo)"),
        "{stderr}"
    );
}

#[test]
fn logs_in_a_file_are_plain_text_and_durations_have_no_float_noise() {
    let mut lab = lab_without_agent(&examples_dir()).expect("lab");
    lab.start_agent(&[]).expect("agent");
    let log = lab.agent_log();
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{log}"
    );
    let synced = log
        .lines()
        .find(|line| line.contains(" synced "))
        .unwrap_or_else(|| panic!("no sync line:\n{log}"));
    let elapsed = synced
        .split_whitespace()
        .find_map(|field| field.strip_prefix("elapsed_ms="))
        .unwrap_or_else(|| panic!("no elapsed_ms in {synced}"));
    // Whole microseconds: at most three decimals.
    let decimals = elapsed
        .split_once('.')
        .map_or(0, |(_, fraction)| fraction.len());
    assert!(decimals <= 3 && elapsed.parse::<f64>().is_ok(), "{synced}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let mut lab = lab_without_agent(&examples_dir()).expect("lab");
    lab.start_agent(&["--log-format", "json"]).expect("agent");
    let log = lab.agent_log();
    let mut synced = 0;
    for line in log.lines().filter(|line| !line.is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}"));
        assert!(
            value["level"].is_string() && value["fields"]["message"].is_string(),
            "{line}"
        );
        if value["fields"]["message"] == "synced" {
            synced += 1;
            assert!(value["fields"]["elapsed_ms"].is_number(), "{line}");
        }
    }
    assert!(synced >= 1, "no sync line:\n{log}");
}
