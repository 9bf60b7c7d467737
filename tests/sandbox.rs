//! The sandbox against a real container and a real sshd (feature `container`; needs Docker).
//!
//! Containers are named `lmsbx-test-PID-PURPOSE` and labelled `lm-sandbox.test=1`; each run removes
//! what earlier runs left. Tests that break their container (kill it, fork-bomb it) get their own.
#![cfg(feature = "container")]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lm_sandbox::api::{router, ApiConfig, ApiKey, AppState};
use lm_sandbox::engine::fake::FakeRunner;
use lm_sandbox::engine::WorkerConfig;
use lm_sandbox::sandbox::container::{
    self, sandbox_dir, Profile, SandboxState, TransportKind, UpConfig,
};
use lm_sandbox::sandbox::image::{Docker, Progress};
use lm_sandbox::sandbox::keys;
use lm_sandbox::sandbox::ssh::SshExecutor;
use lm_sandbox::sandbox::tenants::{TenantConfig, Tenants};
use lm_sandbox::sandbox::{
    AuditLog, Caller, ExecOutput, ExecRequest, Sandbox, SandboxError, SandboxLimits,
};
use serde_json::{json, Value};

const TEST_LABEL: &str = "lm-sandbox.test=1";

fn docker() -> Docker {
    Docker::new("docker", Progress::Quiet)
}

fn state_root() -> PathBuf {
    std::env::temp_dir().join(format!("lmsbx-test-{}", std::process::id()))
}

fn name(purpose: &str) -> String {
    format!("lmsbx-test-{}-{purpose}", std::process::id())
}

/// Removes the containers and volumes of earlier runs (other PIDs), once per run.
fn clean_stale() {
    static CLEANED: OnceLock<()> = OnceLock::new();
    CLEANED.get_or_init(|| {
        let mine = format!("lmsbx-test-{}-", std::process::id());
        let docker = docker();
        let listed = docker
            .output(&[
                "ps",
                "-a",
                "--filter",
                &format!("label={TEST_LABEL}"),
                "--format",
                "{{.Names}}",
            ])
            .unwrap_or_default();
        for old in listed.lines().filter(|n| !n.starts_with(&mine)) {
            let _ = docker.output(&["rm", "--force", old]);
        }
        let volumes = docker
            .output(&["volume", "ls", "--format", "{{.Name}}"])
            .unwrap_or_default();
        for old in volumes
            .lines()
            .filter(|v| v.starts_with("lmsbx-test-") && !v.starts_with(&mine))
        {
            let _ = docker.output(&["volume", "rm", "--force", old]);
        }
        // Key layers of earlier runs (each run makes new keys); one still in use stays.
        let images = docker
            .output(&["images", "-q", "--filter", &format!("label={TEST_LABEL}")])
            .unwrap_or_default();
        for old in images.lines() {
            let _ = docker.output(&["rmi", old]);
        }
    });
}

struct Fixture {
    name: String,
    dir: PathBuf,
}

fn start(purpose: &str, profile: Profile, transport: TransportKind) -> Fixture {
    clean_stale();
    let config = UpConfig {
        name: name(purpose),
        state_dir: state_root(),
        docker: docker(),
        profile,
        transport,
        labels: vec![TEST_LABEL.into()],
    };
    container::up(&config).unwrap_or_else(|e| panic!("sandbox up {purpose}: {e}"));
    Fixture {
        dir: sandbox_dir(&config.state_dir, &config.name),
        name: config.name,
    }
}

/// The container most tests share (they do not break it).
fn shared() -> &'static Fixture {
    static SHARED: OnceLock<Fixture> = OnceLock::new();
    SHARED.get_or_init(|| start("shared", Profile::default(), TransportKind::Exec))
}

fn executor_with(fixture: &Fixture, connect_timeout: Duration, output_limit: usize) -> SshExecutor {
    let state = SandboxState::load(&fixture.dir).unwrap();
    SshExecutor::new(
        state
            .ssh_config(&fixture.dir, connect_timeout, 16, output_limit)
            .unwrap(),
    )
}

fn executor(fixture: &Fixture) -> SshExecutor {
    executor_with(fixture, Duration::from_secs(10), 1 << 20)
}

fn request(command: &str, timeout_s: f64) -> ExecRequest {
    ExecRequest {
        command: command.into(),
        timeout: Duration::from_secs_f64(timeout_s),
        stdin: None,
        cancel: None,
        live: None,
    }
}

async fn run(executor: &SshExecutor, command: &str) -> ExecOutput {
    executor
        .run(request(command, 20.0))
        .await
        .unwrap_or_else(|e| panic!("{command}: {e}"))
}

#[tokio::test]
async fn exit_codes_streams_stdin_and_environment() {
    let ex = executor(shared());
    let out = run(&ex, "echo out; echo err >&2; exit 3").await;
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str()),
        ("out\n", "err\n")
    );
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.signal, None);
    assert!(!out.timed_out && !out.truncated);

    let out = ex
        .run(ExecRequest {
            stdin: Some(b"hello\nworld\n".to_vec()),
            cancel: None,
            live: None,
            ..request("tr a-z A-Z", 10.0)
        })
        .await
        .unwrap();
    assert_eq!(out.stdout, "HELLO\nWORLD\n");
    // No stdin: end-of-file at once, so `cat` does not wait.
    let out = run(&ex, "cat; echo done").await;
    assert_eq!(out.stdout, "done\n");

    let out = run(&ex, "pwd; id -un; env | sort; tty").await;
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[..2], ["/workspace", "sandbox"]);
    assert!(
        !out.stdout.contains("SSH_"),
        "the environment is scrubbed: {}",
        out.stdout
    );
    assert!(out.stdout.contains("not a tty"), "no PTY: {}", out.stdout);

    let out = run(&ex, "kill -KILL $$").await;
    assert_eq!((out.exit_code, out.signal.as_deref()), (None, Some("KILL")));

    // Quotes, dollars and newlines arrive as written.
    let out = run(&ex, "printf '%s|' \"a b\" 'c$HOME' \"$(echo d)\"\necho").await;
    assert_eq!(out.stdout, "a b|c$HOME|d|\n");
}

#[tokio::test]
async fn a_timeout_kills_the_command_and_its_children() {
    let ex = executor(shared());
    let started = Instant::now();
    let out = ex
        .run(request("sleep 301 & sleep 302; echo unreachable", 1.0))
        .await
        .unwrap();
    assert!(out.timed_out, "{out:?}");
    assert_eq!(out.exit_code, Some(124));
    assert!(!out.stdout.contains("unreachable"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let ps = run(&ex, "ps -eo args").await;
    assert!(
        !ps.stdout.lines().any(|l| l.starts_with("sleep 30")),
        "a child outlived the timeout:\n{}",
        ps.stdout
    );

    // A command that ends on its own takes its background children with it, and does not wait
    // for them.
    let started = Instant::now();
    let out = run(&ex, "sleep 303 & echo started").await;
    assert_eq!((out.stdout.as_str(), out.exit_code), ("started\n", Some(0)));
    assert!(started.elapsed() < Duration::from_secs(5));
    let ps = run(&ex, "ps -eo args").await;
    assert!(
        !ps.stdout.lines().any(|l| l.starts_with("sleep 303")),
        "{}",
        ps.stdout
    );

    // Exiting 124 by itself, before the deadline, is not a timeout.
    let out = run(&ex, "exit 124").await;
    assert!(!out.timed_out);
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn twenty_megabytes_of_output_are_truncated_in_bounded_memory() {
    let limit = 64 * 1024;
    let ex = executor_with(shared(), Duration::from_secs(10), limit);
    run(&ex, "true").await;
    let before = peak_rss_kib();
    let out = run(
        &ex,
        "head -c 20000000 /dev/zero | tr '\\0' x; head -c 3000000 /dev/zero | tr '\\0' y >&2",
    )
    .await;
    let grown_kib = peak_rss_kib().saturating_sub(before);
    assert_eq!(out.exit_code, Some(0));
    assert!(out.truncated);
    assert_eq!(
        (out.stdout_bytes, out.stderr_bytes),
        (20_000_000, 3_000_000)
    );
    assert!(out.stdout.starts_with(&"x".repeat(limit)));
    assert!(out.stdout.len() < limit + 200, "{}", out.stdout.len());
    assert!(out
        .stdout
        .ends_with("[lm-sandbox: output truncated: 19934464 of 20000000 bytes omitted]\n"));
    assert!(out.stderr.contains("output truncated: 2934464 of 3000000"));
    assert!(
        grown_kib < 12 * 1024,
        "peak memory grew by {grown_kib} KiB for 23 MB of output"
    );
}

#[tokio::test]
async fn sixteen_concurrent_commands_all_return_their_own_results() {
    let ex = Arc::new(executor(shared()));
    let started = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let ex = ex.clone();
            tokio::spawn(async move {
                let command = format!("echo out{i}; sleep 1; echo err{i} >&2; exit {i}");
                (i, ex.run(request(&command, 20.0)).await)
            })
        })
        .collect();
    for task in tasks {
        let (i, out) = task.await.unwrap();
        let out = out.unwrap();
        assert_eq!(out.stdout, format!("out{i}\n"));
        assert_eq!(out.stderr, format!("err{i}\n"));
        assert_eq!(out.exit_code, Some(i));
    }
    // They ran together on one connection, not one after another.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_wrong_host_key_and_a_wrong_client_key_are_refused() {
    let fixture = shared();
    let state = SandboxState::load(&fixture.dir).unwrap();
    let good = state
        .ssh_config(&fixture.dir, Duration::from_secs(10), 4, 1 << 20)
        .unwrap();

    let mut wrong_host = good.clone();
    wrong_host.host_key = keys::generate("impostor").public_key().clone();
    let started = Instant::now();
    let err = SshExecutor::new(wrong_host)
        .run(request("echo should-not-run", 5.0))
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::HostKeyMismatch { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, not retried"
    );

    let mut wrong_client = good.clone();
    wrong_client.client_key = Arc::new(keys::generate("stranger"));
    let err = SshExecutor::new(wrong_client)
        .run(request("echo should-not-run", 5.0))
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::AuthRejected(_)), "{err}");

    let mut root = good;
    root.user = "root".into();
    let err = SshExecutor::new(root)
        .run(request("id", 5.0))
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::AuthRejected(_)), "{err}");
}

#[tokio::test]
async fn hostile_commands_are_contained() {
    let fixture = start(
        "hostile",
        Profile {
            memory: "256m".into(),
            pids_limit: 64,
            ..Profile::default()
        },
        TransportKind::Exec,
    );
    let ex = executor(&fixture);

    // A fork bomb (its shell kept alive by `sleep`) hits the pids limit and dies with its group at the
    // timeout.
    let out = ex
        .run(request(":(){ :|:& };: ; sleep 10", 3.0))
        .await
        .expect("the fork bomb returns a result");
    assert!(out.timed_out, "{out:?}");
    assert!(
        out.stderr.contains("Resource temporarily unavailable"),
        "the pids limit stopped it: {out:?}"
    );
    let healthy = run(&ex, "echo alive; ps -e --no-headers | wc -l").await;
    assert!(healthy.stdout.starts_with("alive\n"), "{healthy:?}");
    let processes: u32 = healthy
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        processes < 16,
        "{processes} processes left after the fork bomb"
    );

    // A memory hog is killed inside the container.
    let out = run(&ex, "python3 -c \"s = 'x' * (1024 ** 3); print(len(s))\"").await;
    assert_ne!(out.exit_code, Some(0), "{out:?}");
    assert!(
        out.signal.as_deref() == Some("KILL") || out.stderr.contains("MemoryError"),
        "{out:?}"
    );
    assert_eq!(run(&ex, "echo alive").await.stdout, "alive\n");

    // A canary file on the host is nowhere in the container.
    let token = format!("canary-{:016x}", rand::random::<u64>());
    let canary = state_root().join("canary.txt");
    std::fs::write(&canary, &token).unwrap();
    let out = ex
        .run(ExecRequest {
            command: format!(
                "cat {} 2>&1; grep -rlsF --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev \
                 {token} /; echo grep=$?",
                canary.display()
            ),
            ..request("", 120.0)
        })
        .await
        .unwrap();
    assert!(
        out.stdout.starts_with("cat: ") && out.stdout.contains("No such file"),
        "{out:?}"
    );
    // grep prints the paths of matching files (it exits 2 for the files it may not read).
    assert!(
        out.stdout.ends_with("grep=1\n") || out.stdout.ends_with("grep=2\n"),
        "{out:?}"
    );
    assert!(!out.stdout.lines().any(|l| l.starts_with('/')), "{out:?}");

    // No network interface but loopback, and the host's loopback ports are out of reach.
    assert_eq!(run(&ex, "ls /sys/class/net").await.stdout, "lo\n");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = run(
        &ex,
        &format!(
            "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2)\" 2>&1; echo rc=$?"
        ),
    )
    .await;
    assert!(out.stdout.contains("rc=1"), "{out:?}");
    assert!(
        listener.accept().is_err(),
        "the host's listener got a connection"
    );

    // Not root, and no way to become root.
    let out = run(
        &ex,
        "id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; \
         find / -xdev -perm /6000 -type f 2>/dev/null | wc -l; \
         command -v sudo || echo no-sudo; su -c id root </dev/null 2>&1 | tail -1",
    )
    .await;
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "1000");
    assert!(lines.contains(&"CapEff:\t0000000000000000"), "{lines:?}");
    // The container keeps KILL, SETGID, SETUID and SYS_CHROOT for root's sshd; a command holds
    // none of them (effective and permitted sets empty, no-new-privileges, no set-uid programs).
    assert!(lines.contains(&"CapBnd:\t00000000000400e0"), "{lines:?}");
    assert!(lines.contains(&"NoNewPrivs:\t1"), "{lines:?}");
    assert_eq!(lines[4], "0", "set-uid programs: {lines:?}");
    assert_eq!(lines[5], "no-sudo");
    assert!(!out.stdout.contains("uid=0"), "{lines:?}");

    // Writes outside /workspace and /tmp fail.
    let out = run(
        &ex,
        "for d in / /etc /usr /usr/local/bin /var /root /run /home /opt /dev/shm /var/tmp; do \
           touch \"$d/lmsbx-probe\" 2>/dev/null && echo \"wrote $d\"; done; \
         touch /workspace/ok /tmp/ok && echo writable",
    )
    .await;
    assert_eq!(out.stdout, "writable\n", "{out:?}");

    // sshd's secrets and configuration are root's: unreadable and unchangeable from a command.
    let out = run(
        &ex,
        "grep -q 'CapPrm:\t0000000000000000' /proc/self/status && echo no-permitted-caps; \
         cat /etc/lm-sandbox/ssh_host_ed25519_key >/dev/null 2>&1 || echo key-unreadable; \
         for f in /etc/lm-sandbox/sshd_config /etc/lm-sandbox/authorized_keys; do \
           echo x >> $f 2>/dev/null && echo \"wrote $f\"; done; \
         cat /proc/1/environ >/dev/null 2>&1 || echo init-unreadable",
    )
    .await;
    assert_eq!(
        out.stdout, "no-permitted-caps\nkey-unreadable\ninit-unreadable\n",
        "{out:?}"
    );

    // Nothing a command starts outlives it: background jobs, `setsid`, double forks, `nohup`.
    let out = run(
        &ex,
        "sleep 1001 & setsid sleep 1002 & (setsid bash -c 'sleep 1003 &' &); \
         nohup sleep 1004 >/dev/null 2>&1 & disown; echo started",
    )
    .await;
    assert_eq!(out.stdout, "started\n", "{out:?}");
    let left = run(&ex, "ps -eo args | grep -c '^sleep 100[1-4]' || true").await;
    assert_eq!(left.stdout, "0\n", "survivors: {left:?}");
    // `kill -9 -1` from a command reaches only its own user's processes: its runner and session
    // die (the connection is lost), root's sshd and init do not, and what it left behind is
    // killed by init (re-parented to PID 1).
    let _ = ex.run(request("sleep 1005 & kill -9 -1", 10.0)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = run(&ex, "ps -eo user,args").await;
    assert!(after.stdout.contains("lm-sandbox-init"), "{after:?}");
    assert!(!after.stdout.contains("sleep 1005"), "{after:?}");

    // Still healthy after all that.
    assert_eq!(run(&ex, "echo alive").await.stdout, "alive\n");
    container::down(&docker(), &fixture.name, true).unwrap();
}

#[tokio::test]
async fn a_killed_container_fails_the_command_and_the_next_one_succeeds_once_it_is_back() {
    let fixture = start("restart", Profile::default(), TransportKind::Exec);
    let ex = Arc::new(executor_with(&fixture, Duration::from_secs(3), 1 << 20));
    assert_eq!(run(&ex, "echo up").await.stdout, "up\n");

    let running = {
        let ex = ex.clone();
        tokio::spawn(async move { ex.run(request("echo started; sleep 30", 60.0)).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    docker().output(&["kill", &fixture.name]).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the command ends when its container dies")
        .unwrap();
    let err = result.unwrap_err();
    assert!(
        matches!(err, SandboxError::Lost(_) | SandboxError::Unavailable(_)),
        "{err}"
    );

    // While it is down: an error within the connect timeout, never a hang.
    let started = Instant::now();
    let err = ex.run(request("echo down", 5.0)).await.unwrap_err();
    assert!(matches!(err, SandboxError::Unavailable(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    docker().output(&["start", &fixture.name]).unwrap();
    assert_eq!(run(&ex, "echo back").await.stdout, "back\n");
    container::down(&docker(), &fixture.name, true).unwrap();
}

#[tokio::test]
async fn the_tcp_transport_reaches_sshd_on_the_internal_network() {
    let fixture = start("tcp", Profile::default(), TransportKind::Tcp);
    let state = SandboxState::load(&fixture.dir).unwrap();
    assert!(state.addr.as_deref().unwrap().ends_with(":2222"));
    let ex = executor(&fixture);
    let out = run(&ex, "echo over tcp; ls /sys/class/net | sort").await;
    assert_eq!(out.stdout.lines().next(), Some("over tcp"));
    assert!(out.stdout.contains("eth0") && out.stdout.contains("lo"));
    container::down(&docker(), &fixture.name, true).unwrap();
}

#[tokio::test]
async fn up_is_idempotent_and_keeps_the_pinned_host_key() {
    let fixture = shared();
    let before = SandboxState::load(&fixture.dir).unwrap();
    let again = start("shared", Profile::default(), TransportKind::Exec);
    let after = SandboxState::load(&again.dir).unwrap();
    assert_eq!(before, after);
    assert_eq!(run(&executor(fixture), "echo same").await.stdout, "same\n");
}

/// The median time of `true` through the executor: the per-command overhead.
#[tokio::test]
async fn per_command_overhead_is_small() {
    let ex = executor(shared());
    run(&ex, "true").await;
    let mut times: Vec<Duration> = Vec::new();
    for _ in 0..30 {
        let started = Instant::now();
        let out = run(&ex, "true").await;
        times.push(started.elapsed());
        assert_eq!(out.exit_code, Some(0));
    }
    times.sort();
    let median = times[times.len() / 2];
    eprintln!(
        "per-command overhead: median {:.1} ms, min {:.1} ms, max {:.1} ms over {} runs of `true`",
        median.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        times.len()
    );
    assert!(median < Duration::from_millis(500), "{median:?}");
}

fn cli(fixture: &Fixture, args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lm-sandbox"))
        .arg("sandbox")
        .arg(args[0])
        .args(["--sandbox-state-dir", state_root().to_str().unwrap()])
        .args(["--sandbox-name", &fixture.name])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn the_cli_runs_commands_and_reports_status() {
    let fixture = shared();
    let out = cli(
        fixture,
        &["exec", "--", "tr", "a-z", "A-Z;", "exit", "5"],
        b"shout\n",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "SHOUT\n");
    assert_eq!(out.status.code(), Some(5));
    let out = cli(fixture, &["exec", "--timeout", "1", "--", "sleep 10"], b"");
    assert_eq!(out.status.code(), Some(124));
    let out = cli(fixture, &["status"], b"");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ssh: ok"));
    let audit = std::fs::read_to_string(fixture.dir.join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"command\":\"tr a-z A-Z; exit 5\""),
        "{audit}"
    );
}

// ---- HTTP: the real router, a fake engine, the real sandbox ----

const RUNNER_KEY: &str = "runner-key";
const PLAIN_KEY: &str = "plain-key";

async fn serve(sandbox: Sandbox) -> String {
    let engine = FakeRunner::new(Duration::ZERO).spawn(WorkerConfig {
        n_seq: 1,
        n_batch: 64,
        n_ctx_seq: 256,
        max_queue: 4,
    });
    let config = ApiConfig {
        model_ids: vec!["fake".into()],
        api_keys: ApiKey::list(&[PLAIN_KEY.into()], &[RUNNER_KEY.into()]),
        n_predict: None,
        chat_template: None,
        created: 0,
        max_tool_rounds: 4,
        ..ApiConfig::default()
    };
    let app = router(AppState::from_parts(engine, config, None, Some(sandbox)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn sandbox_for(fixture: &Fixture, audit: &Path, connect_timeout: Duration) -> Sandbox {
    let ex = executor_with(fixture, connect_timeout, 1 << 20);
    Sandbox::new(
        Arc::new(ex),
        AuditLog::open(audit).await.unwrap(),
        SandboxLimits::default(),
    )
}

async fn post(base: &str, key: Option<&str>, body: Value) -> (u16, Option<String>, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/v1/sandbox/exec"))
        .json(&body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, id, resp.json().await.unwrap())
}

#[tokio::test]
async fn http_exec_needs_a_sandbox_key_and_is_audited() {
    let audit = state_root().join("http-audit.jsonl");
    let base = serve(sandbox_for(shared(), &audit, Duration::from_secs(10)).await).await;

    let (status, _, body) = post(&base, None, json!({"command": "id"})).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = post(&base, Some(PLAIN_KEY), json!({"command": "id"})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["type"], "permission_error");

    let (status, id, body) = post(
        &base,
        Some(RUNNER_KEY),
        json!({"command": "cat; echo oops >&2; exit 2", "stdin": "fed\n", "timeout_s": 10}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"stdout": "fed\n", "stderr": "oops\n", "exit_code": 2, "signal": null,
               "timed_out": false, "truncated": false, "cancelled": false,
               "duration_ms": body["duration_ms"]})
    );
    let (status, _, body) = post(
        &base,
        Some(RUNNER_KEY),
        json!({"command": "sleep 5", "timeout_s": 0.5}),
    )
    .await;
    assert_eq!(status, 200, "a timeout is a result: {body}");
    assert_eq!(body["timed_out"], true);

    for (bad, param) in [
        (json!({}), "command"),
        (json!({"command": ""}), "command"),
        (json!({"command": 5}), "command"),
        (json!({"command": "id", "timeout_s": -1}), "timeout_s"),
        (json!({"command": "id", "timeout_s": 100000}), "timeout_s"),
        (json!({"command": "id", "stdin": 3}), "stdin"),
    ] {
        let (status, _, body) = post(&base, Some(RUNNER_KEY), bad.clone()).await;
        assert_eq!(status, 400, "{bad} -> {body}");
        assert_eq!(body["error"]["param"], param, "{bad} -> {body}");
    }
    let (status, _, _) = post(
        &base,
        Some(RUNNER_KEY),
        json!({"command": "id", "shell": "zsh"}),
    )
    .await;
    assert_eq!(status, 400);

    let log = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = lines
        .iter()
        .find(|l| l["request_id"] == id.clone().unwrap().as_str() && l["event"] == "end")
        .expect("the audit log names the request");
    assert_eq!(first["command"], "cat; echo oops >&2; exit 2");
    assert_eq!(first["key_id"], ApiKey::new(RUNNER_KEY, true).id().as_str());
    assert_eq!(first["exit_code"], 2);
    assert_eq!(first["bytes_out"], 9);
    assert!(!log.contains(RUNNER_KEY), "the key itself is never logged");
    assert_eq!(
        lines.len(),
        4,
        "a start and an end line per command; refused and invalid requests run nothing"
    );
}

#[tokio::test]
async fn http_exec_answers_503_within_the_connect_timeout_when_the_sandbox_is_down() {
    let fixture = start("down", Profile::default(), TransportKind::Exec);
    docker()
        .output(&["stop", "--time", "0", &fixture.name])
        .unwrap();
    let audit = state_root().join("down-audit.jsonl");
    let base = serve(sandbox_for(&fixture, &audit, Duration::from_secs(2)).await).await;
    let started = Instant::now();
    let (status, _, body) = post(&base, Some(RUNNER_KEY), json!({"command": "id"})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "sandbox_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let health = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200, "the server stays healthy");
    container::down(&docker(), &fixture.name, true).unwrap();
}

/// The real binary serving the default model with the shared sandbox; killed when dropped.
#[cfg(feature = "real-model")]
async fn spawn_serve(extra: &[&str], audit: &Path) -> (tokio::process::Child, String) {
    let fixture = shared();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    let server = tokio::process::Command::new(env!("CARGO_BIN_EXE_lm-sandbox"))
        .args([
            "serve",
            "-m",
            model,
            "--port",
            &port.to_string(),
            "--parallel",
            "1",
        ])
        .args(["--sandbox", "--sandbox-api-key", RUNNER_KEY])
        .args(["--sandbox-state-dir", state_root().to_str().unwrap()])
        .args(["--sandbox-name", &fixture.name])
        .args(["--sandbox-audit-log", audit.to_str().unwrap()])
        .args(extra)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reqwest::get(format!("{base}/health"))
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "the server did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (server, base)
}

/// The real binary: `serve --sandbox` on the default model, wired to the shared sandbox by flags.
#[cfg(feature = "real-model")]
#[tokio::test]
async fn serve_with_the_sandbox_flag_runs_commands_over_http() {
    let audit = state_root().join("serve-audit.jsonl");
    let (mut server, base) = spawn_serve(&["-c", "512"], &audit).await;
    let (status, id, body) = post(
        &base,
        Some(RUNNER_KEY),
        json!({"command": "echo from-serve; id -u"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stdout"], "from-serve\n1000\n");
    let (status, _, _) = post(&base, None, json!({"command": "id"})).await;
    assert_eq!(status, 401);
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(log.contains(id.unwrap().as_str()), "{log}");
    server.start_kill().unwrap();
    let _ = server.wait().await;
}

/// The whole flow on the real model and the real container: a forced `shell` call runs in the
/// sandbox, its result reaches the model, an answer comes back, and the audit log has the command.
#[cfg(feature = "real-model")]
#[tokio::test]
async fn the_real_model_runs_a_forced_shell_call_in_the_sandbox_and_answers() {
    let audit = state_root().join("loop-audit.jsonl");
    let (mut server, base) = spawn_serve(&["-c", "4096", "--api-key", PLAIN_KEY], &audit).await;
    let request = json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": "Use the shell tool to run this command: echo hello-sandbox"}],
        "tool_choice": {"type": "function", "function": {"name": "shell"}},
        "sandbox": {"shell": true, "max_tool_rounds": 2},
        "temperature": 0,
        "max_tokens": 96,
    });
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(RUNNER_KEY)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&body).unwrap());
    let executions = body["sandbox_executions"].as_array().unwrap();
    assert!(!executions.is_empty(), "{body}");
    let first = &executions[0];
    let command = first["command"].as_str().unwrap();
    assert!(command.contains("echo"), "the model's command: {command}");
    assert!(first["result"]["exit_code"].is_number(), "{first}");
    assert!(
        first["result"]["stdout"]
            .as_str()
            .unwrap()
            .contains("hello"),
        "{first}"
    );
    let choice = &body["choices"][0];
    assert!(
        choice["message"]["content"].is_string(),
        "an answer comes back: {body}"
    );
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let log = std::fs::read_to_string(&audit).unwrap();
    let line = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["request_id"] == request_id.as_str())
        .expect("the audit log has the loop's command");
    assert_eq!(line["command"], command);
    // The binary keys ids with this install's secret, which it created next to sandbox.json.
    let secret = std::fs::read(state_root().join(&shared().name).join("key-id.secret")).unwrap();
    assert_eq!(
        line["key_id"],
        lm_sandbox::api::auth::keyed_id(&secret, RUNNER_KEY).as_str()
    );

    // A key without the sandbox permission cannot trigger it.
    let refused = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(PLAIN_KEY)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    server.start_kill().unwrap();
    let _ = server.wait().await;
}

/// A tenant pool over `fixture`'s image, with small limits for the tests.
fn tenants_for(fixture: &Fixture, tune: impl FnOnce(&mut TenantConfig)) -> Arc<Tenants> {
    let state = SandboxState::load(&fixture.dir).unwrap();
    let mut ssh = state
        .ssh_config(&fixture.dir, Duration::from_secs(10), 8, 1 << 20)
        .unwrap();
    ssh.queue_timeout = Duration::from_secs(10);
    let mut config = TenantConfig {
        docker: docker(),
        state,
        ssh,
        disk_bytes: 16 << 20,
        // Room for the tenants other tests make of the shared sandbox: a new pool adopts them.
        max_tenants: 32,
        max_sessions: 4,
        idle_stop: Duration::from_secs(600),
        idle_remove: Duration::from_secs(3600),
        record: fixture.dir.join("tenants.json"),
    };
    tune(&mut config);
    Tenants::new(config)
}

fn caller(key: &str, session: Option<&str>) -> Caller {
    Caller {
        request_id: format!("req-{key}"),
        key_id: Some(key.into()),
        session: session.map(str::to_owned),
        max_sessions: None,
    }
}

async fn tenant_run(sandbox: &Sandbox, who: &Caller, command: &str) -> ExecOutput {
    sandbox
        .run(request(command, 30.0), who)
        .await
        .unwrap_or_else(|e| panic!("{command}: {e}"))
}

#[tokio::test]
async fn tenants_cannot_see_signal_or_fill_each_other() {
    let fixture = shared();
    let audit = state_root().join("tenants-audit.jsonl");
    let sandbox = Sandbox::new(
        tenants_for(fixture, |_| {}),
        AuditLog::open(&audit).await.unwrap(),
        SandboxLimits::default(),
    );
    let (alice, bob) = (caller("key-alice", None), caller("key-bob", None));
    let out = tenant_run(
        &sandbox,
        &alice,
        "echo secret > /workspace/alice.txt; hostname",
    )
    .await;
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    // Bob: none of Alice's files, and a different container.
    let out = tenant_run(
        &sandbox,
        &bob,
        "ls -A /workspace; cat /workspace/alice.txt 2>&1",
    )
    .await;
    assert!(!out.stdout.contains("secret"), "{out:?}");
    // A session within a key is a tenant of its own.
    let alice_b = caller("key-alice", Some("b"));
    let out = tenant_run(&sandbox, &alice_b, "ls -A /workspace").await;
    assert_eq!(out.stdout, "", "{out:?}");
    assert_eq!(
        tenant_run(&sandbox, &alice, "cat /workspace/alice.txt")
            .await
            .stdout,
        "secret\n"
    );

    // Alice runs a command; Bob's `kill -9 -1` and his view of processes do not reach it.
    let long = {
        let sandbox = sandbox.clone();
        let alice = alice.clone();
        tokio::spawn(
            async move { tenant_run(&sandbox, &alice, "sleep 3; echo alice-finished").await },
        )
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let seen = tenant_run(&sandbox, &bob, "ps -eo args").await;
    assert!(!seen.stdout.contains("sleep 3"), "{seen:?}");
    let _ = sandbox
        .run(request("kill -9 -1; sleep 1", 10.0), &bob)
        .await;
    let out = long.await.unwrap();
    assert_eq!(out.stdout, "alice-finished\n", "{out:?}");
    assert_eq!(out.exit_code, Some(0));

    // Filling the workspace is a clean error inside the container (16 MiB here).
    let out = tenant_run(
        &sandbox,
        &bob,
        "dd if=/dev/zero of=/workspace/fill bs=1M count=64 2>&1 | grep -o 'No space left on device'; \
         df -B1M --output=size /workspace | tail -1; rm /workspace/fill; echo ok",
    )
    .await;
    assert!(out.stdout.contains("No space left on device"), "{out:?}");
    let size: u64 = out.stdout.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(size <= 16, "{out:?}");
    assert!(out.stdout.ends_with("ok\n"));

    // `sandbox status` lists the tenants; `sandbox down` (at the end of the suite) removes them.
    let listed = container::tenants(&docker(), &fixture.name).unwrap();
    assert!(listed.len() >= 3, "{listed:?}");
    // The workspace's memory comes on top of the processes' limit (1 GiB + 16 MiB here).
    let memory = docker()
        .output(&[
            "inspect",
            "--format",
            "{{.HostConfig.Memory}}",
            &listed[0].name,
        ])
        .unwrap();
    assert_eq!(memory.trim(), ((1u64 << 30) + (16 << 20)).to_string());
    let _ = std::fs::remove_file(&audit);
}

#[tokio::test]
async fn tenants_are_capped_paused_when_idle_and_woken_on_use() {
    let fixture = start("tenants-cap", Profile::default(), TransportKind::Exec);
    let tenants = tenants_for(&fixture, |c| {
        c.max_tenants = 2;
        c.idle_stop = Duration::from_secs(1);
    });
    let audit = state_root().join("cap-audit.jsonl");
    let sandbox = Sandbox::new(
        tenants,
        AuditLog::open(&audit).await.unwrap(),
        SandboxLimits::default(),
    );
    let (a, b, c) = (caller("a", None), caller("b", None), caller("c", None));
    tenant_run(&sandbox, &a, "true").await;
    // Two tenants busy at once: a third is refused as busy, not queued forever.
    let busy = {
        let sandbox = sandbox.clone();
        let b = b.clone();
        tokio::spawn(async move { tenant_run(&sandbox, &b, "sleep 4").await })
    };
    let hold_a = {
        let sandbox = sandbox.clone();
        let a = a.clone();
        tokio::spawn(async move { tenant_run(&sandbox, &a, "sleep 4").await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let refused = sandbox.run(request("true", 5.0), &c).await;
    assert!(matches!(refused, Err(SandboxError::Busy(_))), "{refused:?}");
    busy.await.unwrap();
    hold_a.await.unwrap();
    // Idle tenants are paused, then woken by their next command.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let name = lm_sandbox::sandbox::tenants::container_name(&fixture.name, &a.tenant());
    let status = docker()
        .output(&["inspect", "--format", "{{.State.Status}}", &name])
        .unwrap();
    assert_eq!(status.trim(), "paused");
    assert_eq!(
        tenant_run(&sandbox, &a, "echo awake").await.stdout,
        "awake\n"
    );
    // Over the cap, only the key's own paused tenant makes room: another key's never does (its
    // workspace would go with it).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refused = sandbox.run(request("echo c", 5.0), &c).await;
    assert!(
        matches!(&refused, Err(SandboxError::Busy(m)) if m.contains("other keys")),
        "{refused:?}"
    );
    let a2 = caller("a", Some("second"));
    assert_eq!(tenant_run(&sandbox, &a2, "echo a2").await.stdout, "a2\n");
    let left = container::tenants(&docker(), &fixture.name).unwrap();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.iter().all(|t| t.owner == "a" || t.owner == "b"),
        "{left:?}"
    );
    // A new pool (a restarted server) adopts the existing tenants with their owners: they count
    // against the cap and stay theirs. The old pool goes first, as with a real restart: its
    // reaper (1 s idle) would otherwise pause a tenant the new pool is using.
    drop(sandbox);
    let restarted = Sandbox::new(
        tenants_for(&fixture, |c| c.max_tenants = 2),
        AuditLog::open(&audit).await.unwrap(),
        SandboxLimits::default(),
    );
    let d = caller("d", None);
    let refused = restarted.run(request("echo d", 5.0), &d).await;
    assert!(matches!(refused, Err(SandboxError::Busy(_))), "{refused:?}");
    assert_eq!(
        tenant_run(&restarted, &b, "echo again").await.stdout,
        "again\n"
    );
    // A key's own cap on sessions: with a cap of one, b's second session is refused while its
    // first is awake (it just ran; only a paused one of its own would make room).
    let mut one = caller("b", Some("other"));
    one.max_sessions = Some(1);
    let refused = restarted.run(request("true", 5.0), &one).await;
    assert!(
        matches!(&refused, Err(SandboxError::Busy(m)) if m.contains("--sandbox-max-sessions")),
        "{refused:?}"
    );
    container::down(&docker(), &fixture.name, true).unwrap();
    assert!(container::tenants(&docker(), &fixture.name)
        .unwrap()
        .is_empty());
    let _ = std::fs::remove_file(&audit);
}

#[tokio::test]
async fn the_audit_log_records_intent_first_outcome_always_and_fails_closed() {
    let fixture = shared();
    let audit = state_root().join("intent-audit.jsonl");
    let sandbox = Sandbox::new(
        tenants_for(fixture, |_| {}),
        AuditLog::open(&audit).await.unwrap(),
        SandboxLimits::default(),
    );
    let who = caller("key-audit", None);
    // The client goes away mid-command: both lines are still written.
    let run = sandbox.run(
        ExecRequest {
            command: "sleep 2; echo done".into(),
            timeout: Duration::from_secs(10),
            stdin: Some(b"some script".to_vec()),
            cancel: None,
            live: None,
        },
        &who,
    );
    let _ = tokio::time::timeout(Duration::from_millis(500), run).await;
    let started = std::fs::read_to_string(&audit).unwrap();
    assert!(started.contains("\"event\":\"start\""), "{started}");
    assert!(started.contains("\"stdin_bytes\":11"), "{started}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ended = std::fs::read_to_string(&audit).unwrap();
    let end: Value = ended
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["event"] == "end")
        .expect("an end line after the client left");
    assert_eq!(end["exit_code"], 0, "{ended}");
    assert_eq!(end["stdout_bytes"], 5);

    // One slot: a second command waits at most the queue deadline, then `Busy`.
    let one_slot = Sandbox::new(
        tenants_for(fixture, |c| {
            c.ssh.max_concurrent = 1;
            c.ssh.queue_timeout = Duration::from_millis(500);
        }),
        AuditLog::open(&audit).await.unwrap(),
        SandboxLimits::default(),
    );
    let holder = {
        let one_slot = one_slot.clone();
        let who = who.clone();
        tokio::spawn(async move { tenant_run(&one_slot, &who, "sleep 3").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waited = Instant::now();
    let refused = one_slot.run(request("true", 5.0), &who).await;
    assert!(matches!(refused, Err(SandboxError::Busy(_))), "{refused:?}");
    assert!(waited.elapsed() < Duration::from_secs(2));
    holder.await.unwrap();

    // An audit log that cannot be written refuses the command: nothing runs unrecorded.
    let full = Sandbox::new(
        tenants_for(fixture, |_| {}),
        AuditLog::open(Path::new("/dev/full")).await.unwrap(),
        SandboxLimits::default(),
    );
    let refused = full
        .run(request("touch /workspace/ran-unaudited", 5.0), &who)
        .await;
    assert!(
        matches!(refused, Err(SandboxError::AuditFailed(_))),
        "{refused:?}"
    );
    let out = tenant_run(&sandbox, &who, "ls /workspace").await;
    assert!(!out.stdout.contains("ran-unaudited"), "{out:?}");
    let _ = std::fs::remove_file(&audit);
}

/// The official MCP Python SDK against the real binary's `/mcp` with real containers: the tools,
/// a command's output and status, files written and read, two keys' tenants apart, a key without
/// the permission refused, a deadline, progress, and every call in the audit log with its MCP
/// session.
#[cfg(feature = "real-model")]
#[tokio::test]
async fn the_mcp_sdk_uses_the_sandbox_through_mcp() {
    const OTHER_KEY: &str = "runner-two";
    let audit = state_root().join("mcp-audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let extra = [
        "-c",
        "512",
        "--api-key",
        PLAIN_KEY,
        "--sandbox-api-key",
        OTHER_KEY,
    ];
    let (mut server, base) = spawn_serve(&extra, &audit).await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/clients-venv/bin/python");
    assert!(python.is_file(), "run .ci/setup first");
    let script = root.join("tests/clients/mcp_client.py");
    let output = tokio::process::Command::new(python)
        .arg(script)
        .args([base.as_str(), RUNNER_KEY, OTHER_KEY, PLAIN_KEY])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the MCP client failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{stdout}");
    let log = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Every call has its start and end lines; each MCP call's name its MCP session and call
    // (the `true`s of the overhead measurement also went through /v1/sandbox/exec).
    let starts: Vec<&Value> = lines.iter().filter(|l| l["event"] == "start").collect();
    assert!(starts.len() >= 10, "{log}");
    for start in &starts {
        assert!(
            lines
                .iter()
                .any(|l| l["event"] == "end" && l["exec_id"] == start["exec_id"]),
            "no end line for {start}"
        );
        let id = start["request_id"].as_str().unwrap();
        assert!(
            start["command"] == "true" || id.contains(" mcp:"),
            "the MCP session is recorded: {start}"
        );
    }
    let through_mcp = starts
        .iter()
        .filter(|s| s["request_id"].as_str().unwrap().contains(" mcp:"))
        .count();
    assert!(
        through_mcp >= 60,
        "50 timed calls and the others: {through_mcp}"
    );
    let shell = lines
        .iter()
        .find(|l| l["event"] == "start" && l["command"] == "echo out; echo err >&2; exit 3")
        .expect("the shell call's start line");
    let end = lines
        .iter()
        .find(|l| l["event"] == "end" && l["exec_id"] == shell["exec_id"])
        .expect("its end line");
    assert_eq!(end["exit_code"], 3);
    // The cancelled call: its command was stopped (not left to its 60 s deadline), and the
    // audit says so.
    let started = lines
        .iter()
        .find(|l| l["event"] == "start" && l["command"] == "sleep 45; echo never")
        .expect("the cancelled call's start line");
    let ended = lines
        .iter()
        .find(|l| l["event"] == "end" && l["exec_id"] == started["exec_id"])
        .expect("the cancelled call's end line, written before the client finished");
    assert_eq!(ended["cancelled"], true, "{ended}");
    assert!(ended["duration_ms"].as_u64().unwrap() < 20_000, "{ended}");
    server.start_kill().unwrap();
    let _ = server.wait().await;
}
