//! Log-probabilities of sampled tokens: what OpenAI's `logprobs` and `top_logprobs` report.
//!
//! The distribution is the one the token was drawn from before truncation: the model's logits
//! plus the request's `logit_bias`, divided by its temperature (1 for greedy decoding), through a
//! softmax over the whole vocabulary. Penalties and top-k/top-p/min-p truncation are not applied
//! (they would give most alternatives a log-probability of minus infinity).
//!
//! Pure arithmetic over a logits row, so both runners share it and it is unit-tested here. It
//! runs only for requests that ask for log-probabilities: the cost when not asked for is zero.

use super::Token;

/// The most alternatives a request may ask for per token (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// One generated token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: Token,
    /// The token's text as the client receives it (control tokens only when rendered).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The `n` most likely tokens at this position, most likely first.
    pub top: Vec<TopLogprob>,
}

/// An alternative at one position.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: Token,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// How a sequence's logits become the distribution it samples from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shaping {
    /// Divides the logits; 1 for greedy decoding.
    pub temperature: f32,
    pub logit_bias: Vec<(Token, f32)>,
}

impl Shaping {
    pub fn new(temperature: f32, logit_bias: &[(Token, f32)]) -> Self {
        Self {
            temperature: if temperature > 0.0 { temperature } else { 1.0 },
            logit_bias: logit_bias.to_vec(),
        }
    }

    /// The log-probability of `chosen` and the `top_n` most likely tokens with theirs, from one
    /// row of logits (indexed by token id). Two passes over the row and no allocation of its size
    /// (the row is copied only when there are biases): it runs once per generated token.
    pub fn logprobs(
        &self,
        logits: &[f32],
        chosen: Token,
        top_n: usize,
    ) -> (f32, Vec<(Token, f32)>) {
        let biased;
        let shaped: &[f32] = if self.logit_bias.is_empty() {
            logits
        } else {
            let mut copy = logits.to_vec();
            for &(token, bias) in &self.logit_bias {
                if let Some(logit) = copy.get_mut(token as usize) {
                    *logit += bias;
                }
            }
            biased = copy;
            &biased
        };
        let inv_t = 1.0 / self.temperature;
        // Pass 1: the maximum, and the `top_n` largest (kept sorted, largest first; ties keep
        // the lower token id first).
        let mut max = f32::NEG_INFINITY;
        let mut top: Vec<(f32, usize)> = Vec::with_capacity(top_n + 1);
        for (i, &l) in shaped.iter().enumerate() {
            max = max.max(l);
            if top_n > 0 && (top.len() < top_n || l > top[top.len() - 1].0) {
                let at = top.partition_point(|&(t, _)| t >= l);
                top.insert(at, (l, i));
                top.truncate(top_n);
            }
        }
        // Pass 2: log-sum-exp around the maximum, summed in f64 so 150 000 terms lose nothing.
        let sum: f64 = shaped
            .iter()
            .map(|&l| f64::from(((l - max) * inv_t).exp()))
            .sum();
        let log_z = sum.ln() as f32;
        let logprob = |l: f32| (l - max) * inv_t - log_z;
        let chosen_lp = shaped
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |&l| logprob(l));
        let top = top
            .into_iter()
            .map(|(l, i)| (i as Token, logprob(l)))
            .collect();
        (chosen_lp, top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn probabilities_sum_to_one_and_top_is_sorted() {
        let logits = [1.0, 3.0, 2.0, -1.0, 0.5];
        let shaping = Shaping::new(0.0, &[]);
        let (lp, top) = shaping.logprobs(&logits, 1, 5);
        let total: f32 = top.iter().map(|(_, l)| l.exp()).sum();
        assert!(close(total, 1.0), "{total}");
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2, 0, 4, 3]);
        assert!(close(lp, top[0].1));
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!(close(lp, 3.0 - z.ln()));
    }

    #[test]
    fn temperature_and_bias_shape_the_distribution() {
        let logits = [0.0, 1.0, 0.0];
        let (hot, _) = Shaping::new(2.0, &[]).logprobs(&logits, 1, 0);
        let (cold, _) = Shaping::new(0.5, &[]).logprobs(&logits, 1, 0);
        assert!(cold > hot, "a lower temperature sharpens: {cold} vs {hot}");
        let (lp, top) = Shaping::new(1.0, &[(2, 5.0)]).logprobs(&logits, 1, 1);
        assert_eq!(top[0].0, 2, "the biased token leads");
        assert!(lp < (0.5f32).ln());
    }

    #[test]
    fn top_n_beyond_the_vocabulary_and_zero() {
        let logits = [0.0, 0.0];
        assert_eq!(Shaping::new(1.0, &[]).logprobs(&logits, 0, 20).1.len(), 2);
        let (lp, top) = Shaping::new(1.0, &[]).logprobs(&logits, 0, 0);
        assert!(top.is_empty());
        assert!(close(lp, (0.5f32).ln()));
    }

    #[test]
    fn a_banned_token_has_no_probability() {
        let logits = [0.0, 0.0, 0.0];
        let (lp, top) = Shaping::new(1.0, &[(0, f32::NEG_INFINITY)]).logprobs(&logits, 0, 3);
        assert_eq!(lp, f32::NEG_INFINITY);
        assert_eq!(top[2].0, 0);
    }
}
