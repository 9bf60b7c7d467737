//! Per-request sampling settings, in llama.cpp's words. The API translates OpenAI's fields into
//! this once; the runner turns it into a sampler chain.

use super::Token;

/// How the next token is chosen for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: i32,
    /// 0.0 disables min-p.
    pub min_p: f32,
    /// `None` draws a fresh seed.
    pub seed: Option<u32>,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// 1.0 disables the repetition penalty.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_last_n: i32,
    /// Additive logit biases.
    pub logit_bias: Vec<(Token, f32)>,
    /// A GBNF grammar (root rule `root`) the output must match: tool calls and structured output.
    pub grammar: Option<std::sync::Arc<str>>,
}

impl Default for SamplingParams {
    /// OpenAI's defaults: temperature 1, top_p 1, no penalties.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repeat_penalty: 1.0,
            penalty_last_n: 64,
            logit_bias: Vec::new(),
            grammar: None,
        }
    }
}

impl SamplingParams {
    /// Whether any of the penalty samplers would change a logit.
    pub fn has_penalties(&self) -> bool {
        self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 || self.repeat_penalty != 1.0
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}
