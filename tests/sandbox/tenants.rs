//! Tenants (a container per key and session) and the audit log.

use super::*;

/// A tenant pool over `fixture`'s image, with small limits for the tests.
pub(crate) fn tenants_for(fixture: &Fixture, tune: impl FnOnce(&mut TenantConfig)) -> Arc<Tenants> {
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

pub(crate) fn caller(key: &str, session: Option<&str>) -> Caller {
    Caller {
        request_id: format!("req-{key}"),
        key_id: Some(key.into()),
        session: session.map(str::to_owned),
        max_sessions: None,
    }
}

pub(crate) async fn tenant_run(sandbox: &Sandbox, who: &Caller, command: &str) -> ExecOutput {
    sandbox
        .run(request(command, 30.0), who)
        .await
        .unwrap_or_else(|e| panic!("{command}: {e}"))
}

#[tokio::test]
pub(crate) async fn tenants_cannot_see_signal_or_fill_each_other() {
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
pub(crate) async fn tenants_are_capped_paused_when_idle_and_woken_on_use() {
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
pub(crate) async fn the_audit_log_records_intent_first_outcome_always_and_fails_closed() {
    let fixture = shared();
    let audit = state_root().join("intent-audit.jsonl");
    let sandbox = Sandbox::new(
        tenants_for(fixture, |_| {}),
        AuditLog::open(&audit).await.unwrap(),
        SandboxLimits::default(),
    );
    let who = caller("key-audit", None);
    // The client goes away mid-command: both lines are still written.
    let client = {
        let sandbox = sandbox.clone();
        let who = who.clone();
        tokio::spawn(async move {
            let request = ExecRequest {
                command: "sleep 2; echo done".into(),
                timeout: Duration::from_secs(10),
                stdin: Some(b"some script".to_vec()),
                cancel: None,
                live: None,
            };
            sandbox.run(request, &who).await
        })
    };
    let started = audit_once(&audit, |log| log.contains("\"event\":\"start\"")).await;
    client.abort();
    assert!(started.contains("\"stdin_bytes\":11"), "{started}");
    let ended = audit_once(&audit, |log| log.contains("\"event\":\"end\"")).await;
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

/// The audit log once `ready` holds for it, within a deadline (a loaded machine starts a tenant
/// slowly).
async fn audit_once(audit: &Path, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(audit).unwrap_or_default();
        if ready(&log) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "the audit log never got there: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
