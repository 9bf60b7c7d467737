//! One container through `SshExecutor` and the CLI: streams, timeouts, output caps, keys,
//! hostile commands, a killed container, the TCP transport.

use super::*;

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
