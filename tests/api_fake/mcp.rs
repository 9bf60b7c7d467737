//! `/mcp` against the scripted sandbox: the key and scope before any work, the session, and the
//! protocol's edge cases (a wrong protocol version, an unknown session id, a batch, a
//! notification), none of them a 5xx or a lost session.

use super::*;

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"test","version":"1"}}}"#;

fn mcp(key: Option<&str>, session: Option<&str>, body: &str) -> Request<Body> {
    let mut request = Request::post("/mcp")
        .header(header::HOST, "127.0.0.1")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream");
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    if let Some(session) = session {
        request = request
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", "2025-06-18");
    }
    request.body(Body::from(body.to_owned())).unwrap()
}

/// The JSON-RPC messages of an answer (SSE `data:` lines, or one JSON body).
fn messages(body: &str) -> Vec<Value> {
    let data: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    if data.is_empty() {
        serde_json::from_str(body)
            .map(|v| vec![v])
            .unwrap_or_default()
    } else {
        data
    }
}

async fn session(app: &Router) -> String {
    let (status, headers, body) = send(app, mcp(Some("runner"), None, INIT)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let result = &messages(&body)[0]["result"];
    assert_eq!(result["serverInfo"]["name"], "lm-sandbox", "{body}");
    assert!(result["capabilities"]["tools"].is_object());
    let id = headers["mcp-session-id"].to_str().unwrap().to_owned();
    let initialized = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let (status, _, _) = send(app, mcp(Some("runner"), Some(&id), initialized)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "a notification has no answer");
    id
}

#[tokio::test]
async fn mcp_needs_a_sandbox_key_then_runs_tools_in_a_session() {
    let audit =
        std::env::temp_dir().join(format!("lm-sandbox-mcp-audit-{}.jsonl", std::process::id()));
    // Without a sandbox there is no /mcp.
    let without = harness();
    let (status, _, body) = send(&without.app, mcp(None, None, INIT)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let app = loop_harness(LAST_MESSAGE, &audit).await;
    let (status, _, body) = send(&app, mcp(None, None, INIT)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _, body) = send(&app, mcp(Some("plain"), None, INIT)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    let id = session(&app).await;
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let (status, _, body) = send(&app, mcp(Some("runner"), Some(&id), list)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tools = messages(&body)[0]["result"]["tools"].clone();
    let names: Vec<&str> = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["shell", "read_file", "write_file", "list_dir"]);

    let call = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"shell","arguments":{"command":"echo hi"}}}"#;
    let (status, headers, body) = send(&app, mcp(Some("runner"), Some(&id), call)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let result = &messages(&body)[0]["result"];
    assert_eq!(
        result["structuredContent"]["stdout"], "ran echo hi",
        "{body}"
    );
    assert_eq!(result["isError"], false);
    let request_id = headers["x-request-id"].to_str().unwrap();
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(
        log.contains(&format!("{request_id} mcp:{id}:3")),
        "the audit names the request, the MCP session and the call: {log}"
    );

    // Bad arguments: a tool error naming the argument; an unknown tool: a JSON-RPC error.
    let bad = r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"shell","arguments":{"command":"ls","timeout_s":"soon"}}}"#;
    let (status, _, body) = send(&app, mcp(Some("runner"), Some(&id), bad)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let result = &messages(&body)[0]["result"];
    assert_eq!(result["isError"], true, "{body}");
    assert_eq!(result["structuredContent"]["argument"], "timeout_s");
    let unknown =
        r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"nope","arguments":{}}}"#;
    let (status, _, body) = send(&app, mcp(Some("runner"), Some(&id), unknown)).await;
    assert!(status.is_success(), "{status}: {body}");
    let error = &messages(&body)[0]["error"];
    assert_eq!(error["code"], -32602, "{body}");
    // A bad session header names itself.
    let mut with_session = mcp(Some("runner"), Some(&id), call);
    with_session
        .headers_mut()
        .insert("x-sandbox-session", "../x".parse().unwrap());
    let (_, _, body) = send(&app, with_session).await;
    assert_eq!(
        messages(&body)[0]["result"]["structuredContent"]["argument"],
        "x-sandbox-session",
        "{body}"
    );
    std::fs::remove_file(&audit).unwrap();
}

#[tokio::test]
async fn mcp_protocol_edge_cases_are_4xx_and_keep_the_session() {
    let audit = std::env::temp_dir().join(format!(
        "lm-sandbox-mcp-edge-audit-{}.jsonl",
        std::process::id()
    ));
    let app = loop_harness(LAST_MESSAGE, &audit).await;
    // An unknown protocol version at initialize: the server answers with one it speaks.
    let old = INIT.replace("2025-06-18", "1999-01-01");
    let (status, _, body) = send(&app, mcp(Some("runner"), None, &old)).await;
    assert!(status.is_success(), "{status}: {body}");
    let version = messages(&body)[0]["result"]["protocolVersion"].clone();
    assert!(version.is_string() && version != "1999-01-01", "{body}");

    let id = session(&app).await;
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    // A session id this server never gave.
    let (status, _, body) = send(&app, mcp(Some("runner"), Some("no-such-session"), list)).await;
    assert!(status.is_client_error(), "{status}: {body}");
    // A wrong protocol version header on a session.
    let mut wrong = mcp(Some("runner"), Some(&id), list);
    wrong
        .headers_mut()
        .insert("mcp-protocol-version", "1999-01-01".parse().unwrap());
    let (status, _, body) = send(&app, wrong).await;
    assert!(status.is_client_error(), "{status}: {body}");
    // A batch.
    let batch = format!("[{list},{list}]");
    let (status, _, body) = send(&app, mcp(Some("runner"), Some(&id), &batch)).await;
    assert!(!status.is_server_error(), "{status}: {body}");
    // Malformed JSON.
    let (status, _, body) = send(&app, mcp(Some("runner"), Some(&id), "{not json")).await;
    assert!(status.is_client_error(), "{status}: {body}");
    // The session is still there.
    let (status, _, body) = send(&app, mcp(Some("runner"), Some(&id), list)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(messages(&body)[0]["result"]["tools"].is_array(), "{body}");
    // DELETE ends it.
    let delete = Request::delete("/mcp")
        .header(header::HOST, "127.0.0.1")
        .header(header::AUTHORIZATION, "Bearer runner")
        .header("mcp-session-id", &id)
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(&app, delete).await;
    assert!(status.is_success(), "{status}: {body}");
    let (status, _, body) = send(&app, mcp(Some("runner"), Some(&id), list)).await;
    assert!(
        status.is_client_error(),
        "an ended session: {status}: {body}"
    );
    let _ = std::fs::remove_file(&audit);
}
