//! A real OpenAI client crate (`async-openai`) against the server on an ephemeral loopback port.
//! Needs `--features real-model`.

#![cfg(feature = "real-model")]

mod common;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs, FinishReason,
};
use async_openai::Client;
use common::{start, MODEL_ID};
use futures::StreamExt;

const KEY: &str = "sk-test-key";

fn client(addr: std::net::SocketAddr) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{addr}/v1"))
            .with_api_key(KEY),
    )
}

fn request(content: &str, max_tokens: u32) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(MODEL_ID)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(content)
            .build()
            .unwrap()
            .into()])
        .max_completion_tokens(max_tokens)
        .temperature(0.0)
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_openai_client_lists_chats_streams_and_sees_typed_errors() {
    let server = start(&["--parallel", "2", "--api-key", KEY]).await;
    let client = client(server.addr);

    let models = client.models().list().await.unwrap();
    assert_eq!(models.data.len(), 1);
    assert_eq!(models.data[0].id, MODEL_ID);

    let response = client
        .chat()
        .create(request("What is 2 + 2?", 24))
        .await
        .unwrap();
    let choice = &response.choices[0];
    let text = choice.message.content.clone().unwrap();
    assert!(!text.is_empty());
    assert!(matches!(
        choice.finish_reason,
        Some(FinishReason::Stop | FinishReason::Length)
    ));
    let usage = response.usage.unwrap();
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );

    let mut stream = client
        .chat()
        .create_stream(request("What is 2 + 2?", 24))
        .await
        .unwrap();
    let mut streamed = String::new();
    let mut finish = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        for choice in chunk.choices {
            streamed += choice.delta.content.as_deref().unwrap_or("");
            finish = finish.or(choice.finish_reason);
        }
    }
    assert_eq!(streamed, text);
    assert_eq!(finish, choice.finish_reason);

    let mut bad = request("hi", 8);
    bad.temperature = Some(5.0);
    match client.chat().create(bad).await {
        Err(OpenAIError::ApiError(error)) => {
            assert_eq!(error.param.as_deref(), Some("temperature"));
            assert_eq!(error.r#type.as_deref(), Some("invalid_request_error"));
            assert!(error.message.contains('5'), "{}", error.message);
        }
        other => panic!("expected a typed API error, got {other:?}"),
    }

    let unauthorized = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{}/v1", server.addr))
            .with_api_key("wrong"),
    );
    match unauthorized.models().list().await {
        Err(OpenAIError::ApiError(error)) => {
            assert_eq!(error.code.as_deref(), Some("invalid_api_key"))
        }
        other => panic!("expected 401 as an API error, got {other:?}"),
    }
}
