//! Invalid configurations: `gte-supervisor -c FILE` must exit 2 with a message that names the
//! file, the line and the key (e.g. `workers.toml:7: [workers] count: ...`) — and start nothing.

mod common;

use common::*;
use std::fs;
use std::time::Duration;

const VALID: &str = r#"bind = "127.0.0.1:{port}"
pidfile = "{dir}/master.pid"

[app]
wsgi = "testapp:app"
chdir = "{dir}/app"
python = "{python}"

[workers]
count = 2

[log]
access = "{dir}/access.log"
error = "{dir}/error.log"
"#;

/// Run the master on `body` (placeholders filled) and expect exit 2 without starting anything.
fn expect_invalid(name: &str, body: &str) -> (TestDir, Output, String) {
    let dir = TestDir::new(name);
    dir.install_app(&["testapp.py"]);
    let port = free_port();
    let cfg = write_config(&dir, "workers.toml", body, port);
    let text = fs::read_to_string(&cfg).unwrap();
    let out = run_master_to_exit(&dir, &cfg, Duration::from_secs(15));
    assert_eq!(
        out.code(),
        Some(2),
        "invalid config must exit 2\n--- config ---\n{text}\n{}",
        out.dump()
    );
    assert!(
        !dir.join("master.pid").exists(),
        "no pidfile for an invalid config"
    );
    assert!(
        Http::try_connect(port).is_err(),
        "nothing may listen for an invalid config"
    );
    (dir, out, text)
}

fn assert_names(out: &Output, text: &str, key_line_needle: &str, key: &str) {
    let line = line_of(text, key_line_needle);
    let msg = out.all();
    assert!(
        msg.contains(&format!("workers.toml:{line}")),
        "message must name workers.toml:{line}: {msg}"
    );
    assert!(
        msg.contains(key),
        "message must name the key {key:?}: {msg}"
    );
}

#[test]
fn the_valid_base_config_starts() {
    // guards the fixtures below: the base config itself is fine
    let dir = TestDir::new("valid_base");
    dir.install_app(&["testapp.py"]);
    let port = free_port();
    let cfg = write_config(&dir, "workers.toml", VALID, port);
    let mut srv = Server::spawn(&dir, &cfg, port, &dir.path);
    srv.wait_ready(READY_TIMEOUT);
    assert_eq!(srv.get("/").status, 200);
}

#[test]
fn unknown_key_is_rejected() {
    let body = VALID.replace("count = 2\n", "count = 2\nbogus_key = 1\n");
    let (_d, out, text) = expect_invalid("unknown_key", &body);
    assert_names(&out, &text, "bogus_key", "bogus_key");
}

#[test]
fn unknown_section_is_rejected() {
    let body = format!("{VALID}\n[wokers]\ncount = 3\n");
    let (_d, out, text) = expect_invalid("unknown_section", &body);
    assert_names(&out, &text, "[wokers]", "wokers");
}

#[test]
fn wrong_type_is_rejected() {
    let body = VALID.replace("count = 2\n", "count = 2\nthreads = true\n");
    let (_d, out, text) = expect_invalid("wrong_type", &body);
    assert_names(&out, &text, "threads = true", "threads");
}

#[test]
fn zero_workers_is_rejected() {
    let body = VALID.replace("count = 2", "count = 0");
    let (_d, out, text) = expect_invalid("count_zero", &body);
    assert_names(&out, &text, "count = 0", "count");
}

#[test]
fn nonsense_count_string_is_rejected() {
    let body = VALID.replace("count = 2", "count = \"lots\"");
    let (_d, out, text) = expect_invalid("count_string", &body);
    assert_names(&out, &text, "count = \"lots\"", "count");
}

#[test]
fn nonsense_bind_is_rejected() {
    let body = VALID.replace("bind = \"127.0.0.1:{port}\"", "bind = \"nonsense\"");
    let (_d, out, text) = expect_invalid("bind_nonsense", &body);
    assert_names(&out, &text, "bind = \"nonsense\"", "bind");
}

#[test]
fn bad_size_is_rejected() {
    let body = VALID.replace(
        "pidfile =",
        "limit_request_body = \"50 parsecs\"\npidfile =",
    );
    let (_d, out, text) = expect_invalid("bad_size", &body);
    assert_names(&out, &text, "50 parsecs", "limit_request_body");
}

#[test]
fn a_per_line_limit_over_the_head_limit_is_rejected() {
    let body = VALID.replace("pidfile =", "limit_request_line = 100000\npidfile =");
    let (_d, out, text) = expect_invalid("line_limit", &body);
    assert_names(
        &out,
        &text,
        "limit_request_line = 100000",
        "limit_request_line",
    );
    assert!(out.all().contains("limit_request_header"), "{}", out.all());
    let body = VALID.replace("pidfile =", "limit_request_field_size = 10\npidfile =");
    let (_d, out, text) = expect_invalid("field_limit", &body);
    assert_names(
        &out,
        &text,
        "limit_request_field_size = 10",
        "limit_request_field_size",
    );
}

#[test]
fn a_zero_queue_timeout_is_rejected() {
    let body = VALID.replace("count = 2\n", "count = 2\nqueue_timeout = 0\n");
    let (_d, out, text) = expect_invalid("queue_timeout_zero", &body);
    assert_names(&out, &text, "queue_timeout = 0", "queue_timeout");
    assert!(out.all().contains("greater than 0"), "{}", out.all());
}

#[test]
fn bad_duration_is_rejected() {
    let body = VALID.replace("count = 2\n", "count = 2\ntimeout = \"2 fortnights\"\n");
    let (_d, out, text) = expect_invalid("bad_duration", &body);
    assert_names(&out, &text, "2 fortnights", "timeout");
}

#[test]
fn bad_log_level_is_rejected() {
    let body = VALID.replace("[log]\n", "[log]\nlevel = \"chatty\"\n");
    let (_d, out, text) = expect_invalid("bad_level", &body);
    assert_names(&out, &text, "chatty", "level");
}

#[test]
fn missing_app_section_is_rejected() {
    let start = VALID.find("[app]").unwrap();
    let end = VALID.find("[workers]").unwrap();
    let body = format!("{}{}", &VALID[..start], &VALID[end..]);
    let (_d, out, _) = expect_invalid("missing_app", &body);
    let msg = out.all();
    assert!(
        [
            "[app]",
            "`app`",
            "'app'",
            "\"app\"",
            "app section",
            "app.wsgi",
            "[app"
        ]
        .iter()
        .any(|n| msg.contains(n)),
        "message must name the missing [app] table: {msg}"
    );
}

#[test]
fn toml_syntax_error_names_the_line() {
    let body = VALID.replace("count = 2", "count = ");
    let (_d, out, text) = expect_invalid("syntax_error", &body);
    let line = line_of(&text, "count = ");
    assert!(
        out.all().contains(&format!("workers.toml:{line}")),
        "{}",
        out.dump()
    );
}

#[test]
fn missing_config_file_exits_2_naming_it() {
    let dir = TestDir::new("missing_file");
    let path = dir.join("does-not-exist.toml");
    let out = run_bin(
        &dir,
        &["-c", path.to_str().unwrap()],
        Duration::from_secs(15),
    );
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(out.all().contains("does-not-exist.toml"), "{}", out.dump());
}

#[test]
fn preload_with_a_command_app_is_rejected() {
    // {port} would be filled in by write_config: the command's placeholder is spelled PORTSLOT
    // and restored after writing.
    let body = VALID.replace(
        "wsgi = \"testapp:app\"\n",
        "command = [\"{python}\", \"-m\", \"http.server\", \"PORTSLOT\"]\npreload = true\n",
    );
    let dir = TestDir::new("preload_command");
    let cfg = write_config(&dir, "workers.toml", &body, free_port());
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace("PORTSLOT", "{port}");
    fs::write(&cfg, &text).unwrap();
    let out = run_master_to_exit(&dir, &cfg, Duration::from_secs(15));
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert_names(&out, &text, "preload = true", "preload");
    assert!(out.all().contains("bundled WSGI worker"), "{}", out.dump());
}

// ---------------------------------------------------------------------------------------------
// [[process]] entries and routes (issue #8)
// ---------------------------------------------------------------------------------------------

/// Two processes after the valid base config: "model" and "ui" (ui after model).
fn with_processes(extra_model: &str, extra_ui: &str) -> String {
    format!(
        "{VALID}\n[[process]]\nname = \"model\"\ncommand = [\"{{python}}\", \"-m\", \"http.server\"]\n{extra_model}\n\n[[process]]\nname = \"ui\"\ncommand = [\"{{python}}\", \"-c\", \"pass\"]\nafter = [\"model\"]\n{extra_ui}\n"
    )
}

#[test]
fn process_with_unknown_dependency_is_rejected() {
    let body = with_processes("", "").replace("after = [\"model\"]", "after = [\"modle\"]");
    let (_d, out, text) = expect_invalid("proc_unknown_dep", &body);
    assert_names(&out, &text, "after = [\"modle\"]", "[[process]] after");
    assert!(
        out.all().contains("unknown dependency \"modle\""),
        "{}",
        out.dump()
    );
}

#[test]
fn process_dependency_cycle_is_rejected() {
    let body = with_processes("after = [\"ui\"]", "");
    let (_d, out, text) = expect_invalid("proc_cycle", &body);
    assert_names(&out, &text, "after = [\"ui\"]", "[[process]] after");
    assert!(
        out.all().contains("dependency cycle: model -> ui -> model"),
        "{}",
        out.dump()
    );
}

#[test]
fn duplicate_process_name_is_rejected() {
    let body = with_processes("", "").replace("name = \"ui\"", "name = \"model\"");
    let (_d, out, text) = expect_invalid("proc_duplicate", &body);
    // the second `name = "model"` is the duplicate
    let first = line_of(&text, "name = \"model\"");
    let second = text
        .lines()
        .enumerate()
        .skip(first)
        .find(|(_, l)| l.contains("name = \"model\""))
        .map(|(i, _)| i + 1)
        .unwrap();
    assert!(
        out.all()
            .contains(&format!("workers.toml:{second}: [[process]] name")),
        "{}",
        out.dump()
    );
    assert!(out.all().contains("duplicate name"), "{}", out.dump());
}

#[test]
fn empty_process_command_is_rejected() {
    let body = with_processes("", "").replace("[\"{python}\", \"-c\", \"pass\"]", "[]");
    let (_d, out, text) = expect_invalid("proc_empty_command", &body);
    assert_names(&out, &text, "command = []", "[[process]] command");
}

#[test]
fn bad_ready_url_is_rejected() {
    let body = with_processes("ready = { http = \"https://127.0.0.1:8000/health\" }", "");
    let (_d, out, text) = expect_invalid("proc_bad_url", &body);
    assert_names(&out, &text, "ready = {", "[[process]] ready");
    assert!(out.all().contains("http://"), "{}", out.dump());
    let body = with_processes("ready = { http = \"http://model-host/health\" }", "");
    let (_d, out, text) = expect_invalid("proc_bad_url_host", &body);
    assert_names(&out, &text, "ready = {", "[[process]] ready");
}

#[test]
fn route_to_a_missing_process_is_rejected() {
    let body = with_processes("listen = \"127.0.0.1:9\"", "")
        .replace("pidfile =", "routes = { \"/v1/\" = \"vllm\" }\npidfile =");
    let (_d, out, text) = expect_invalid("route_no_process", &body);
    assert_names(&out, &text, "routes = {", "routes");
    assert!(
        out.all().contains("no [[process]] has that name"),
        "{}",
        out.dump()
    );
    // A process without a listen address cannot be routed to either.
    let body =
        with_processes("", "").replace("pidfile =", "routes = { \"/\" = \"ui\" }\npidfile =");
    let (_d, out, _) = expect_invalid("route_no_listen", &body);
    assert!(out.all().contains("no listen address"), "{}", out.dump());
}

#[test]
fn process_user_needs_root_or_must_exist() {
    let root = fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let body = with_processes("user = \"no-such-user-gte\"", "");
    let (_d, out, text) = expect_invalid("proc_user_unknown", &body);
    assert_names(&out, &text, "user = ", "[[process]] user");
    assert!(out.all().contains("no such user"), "{}", out.dump());
    if !root {
        let body = with_processes("user = \"root\"", "");
        let (_d, out, text) = expect_invalid("proc_user_root", &body);
        assert_names(&out, &text, "user = ", "[[process]] user");
        assert!(out.all().contains("needs root"), "{}", out.dump());
    }
}

#[test]
fn only_processes_without_app_is_valid() {
    let start = VALID.find("[app]").unwrap();
    let end = VALID.find("[workers]").unwrap();
    let body = format!(
        "{}{}\n[[process]]\nname = \"solo\"\ncommand = [\"{{python}}\", \"-c\", \"pass\"]\n",
        &VALID[..start],
        &VALID[end..]
    );
    let dir = TestDir::new("proc_only_check");
    let cfg = write_config(&dir, "workers.toml", &body, free_port());
    let out = run_bin(
        &dir,
        &["check", "-c", cfg.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(
        out.stdout.contains("process.solo.command"),
        "{}",
        out.dump()
    );
}

#[test]
fn unknown_process_key_is_rejected() {
    let body = with_processes("restrat = \"always\"", "");
    let (_d, out, text) = expect_invalid("proc_unknown_key", &body);
    assert_names(&out, &text, "restrat = ", "[[process]] restrat");
}

#[test]
fn pipeline_out_of_range_is_rejected() {
    let body = VALID.replace("count = 2\n", "count = 2\npipeline = 0\n");
    let (_d, out, text) = expect_invalid("pipeline_zero", &body);
    assert_names(&out, &text, "pipeline = 0", "pipeline");
    assert!(out.all().contains("1..=8"), "{}", out.dump());
}

#[test]
fn a_body_temp_dir_that_does_not_exist_is_rejected() {
    let body = VALID.replace(
        "pidfile =",
        "body_temp_dir = \"/nonexistent/spool\"\npidfile =",
    );
    let (_d, out, text) = expect_invalid("body_temp_dir_missing", &body);
    assert_names(&out, &text, "/nonexistent/spool", "body_temp_dir");
    assert!(
        out.all().contains("not an existing directory"),
        "{}",
        out.all()
    );
}
