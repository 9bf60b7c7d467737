//! The scheduler driven by the fake runner: no threads, no model.

use std::time::Duration;

use tokio::sync::mpsc;

use super::*;
use crate::engine::fake::{FakeRunner, FAKE_EOS};
use crate::engine::{GenerationRequest, SamplingParams};

fn submission(
    prompt: &str,
    max: u32,
    stop: &[&str],
) -> (Submission, mpsc::Receiver<GenerationEvent>) {
    let (tx, rx) = mpsc::channel(max as usize + 2);
    let request = GenerationRequest {
        prompt: prompt.bytes().map(Token::from).collect(),
        sampling: SamplingParams::default(),
        max_new_tokens: max,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        special_tokens: false,
        logprobs: None,
        usage: None,
    };
    (
        Submission {
            request,
            events: tx,
            submitted_at: std::time::Instant::now(),
        },
        rx,
    )
}

fn drain(rx: &mut mpsc::Receiver<GenerationEvent>) -> (String, Option<GenerationEvent>) {
    let mut text = String::new();
    let mut last = None;
    while let Ok(event) = rx.try_recv() {
        match event {
            GenerationEvent::Text(t) => text += &t,
            other => last = Some(other),
        }
    }
    (text, last)
}

fn run_until_idle(s: &mut Scheduler<FakeRunner>) -> usize {
    let mut steps = 0;
    while !s.is_idle() {
        s.step();
        steps += 1;
        assert!(steps < 10_000, "scheduler did not finish");
    }
    steps
}

fn scheduler(n_seq: usize, n_batch: usize) -> Scheduler<FakeRunner> {
    Scheduler::new(FakeRunner::new(Duration::ZERO), n_seq, n_batch, 256)
}

#[test]
fn a_request_echoes_its_prompt_then_stops_on_eos() {
    let mut s = scheduler(2, 64);
    let (sub, mut rx) = submission("hello", 100, &[]);
    s.admit(sub).unwrap();
    run_until_idle(&mut s);
    let (text, done) = drain(&mut rx);
    assert_eq!(text, "hello");
    match done {
        Some(GenerationEvent::Done { reason, stats }) => {
            assert_eq!(reason, FinishReason::Stop);
            assert_eq!(stats.prompt_tokens, 5);
            assert_eq!(stats.generated_tokens, 6, "5 echoed tokens plus EOS");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(s.runner().log.lock().unwrap().ended, vec![0]);
}

#[test]
fn max_tokens_ends_with_length() {
    let mut s = scheduler(1, 64);
    let (sub, mut rx) = submission("abcdef", 3, &[]);
    s.admit(sub).unwrap();
    run_until_idle(&mut s);
    let (text, done) = drain(&mut rx);
    assert_eq!(text, "abc");
    assert!(matches!(
        done,
        Some(GenerationEvent::Done {
            reason: FinishReason::Length,
            ..
        })
    ));
}

#[test]
fn a_stop_string_across_tokens_ends_generation_without_leaking() {
    let mut s = scheduler(1, 64);
    let (sub, mut rx) = submission("one<END>two", 100, &["<END>"]);
    s.admit(sub).unwrap();
    run_until_idle(&mut s);
    let mut chunks = Vec::new();
    let mut done = None;
    while let Ok(e) = rx.try_recv() {
        match e {
            GenerationEvent::Text(t) => chunks.push(t),
            other => done = Some(other),
        }
    }
    assert_eq!(chunks.concat(), "one");
    assert!(chunks.iter().all(|c| !c.contains('<')), "{chunks:?}");
    assert!(matches!(
        done,
        Some(GenerationEvent::Done {
            reason: FinishReason::StopString(0),
            ..
        })
    ));
}

#[test]
fn multibyte_characters_split_across_tokens_arrive_whole() {
    let mut s = scheduler(1, 64);
    let (sub, mut rx) = submission("é🦀", 100, &[]);
    s.admit(sub).unwrap();
    run_until_idle(&mut s);
    let mut chunks = Vec::new();
    while let Ok(GenerationEvent::Text(t)) = rx.try_recv() {
        chunks.push(t);
    }
    assert_eq!(chunks, vec!["é".to_string(), "🦀".to_string()]);
}

#[test]
fn admission_stops_when_every_slot_is_busy() {
    let mut s = scheduler(2, 64);
    let (a, _ra) = submission("a", 10, &[]);
    let (b, _rb) = submission("b", 10, &[]);
    let (c, _rc) = submission("c", 10, &[]);
    assert!(s.admit(a).is_ok());
    assert!(s.admit(b).is_ok());
    assert!(!s.has_free_slot());
    assert!(
        s.admit(c).is_err(),
        "a third request must wait in the queue"
    );
}

#[test]
fn every_active_sequence_decodes_in_every_step() {
    let mut s = scheduler(3, 64);
    let mut receivers = Vec::new();
    for prompt in ["aaaa", "bbbbbbbb", "cc"] {
        let (sub, rx) = submission(prompt, 100, &[]);
        s.admit(sub).unwrap();
        receivers.push(rx);
    }
    run_until_idle(&mut s);
    let log = s.runner().log.lock().unwrap();
    // Step 1 prefills all three prompts in one batch; then one token per live sequence per step.
    assert_eq!(log.batches[0].len(), 4 + 8 + 2);
    for batch in &log.batches[1..] {
        let mut seqs: Vec<SeqId> = batch.iter().map(|e| e.seq).collect();
        seqs.dedup();
        assert_eq!(
            seqs.len(),
            batch.len(),
            "one token per sequence in decode steps"
        );
    }
    // While all three are live (the shortest echoes 2 tokens + EOS), each step holds all three.
    assert_eq!(log.batches[1].len(), 3);
    assert_eq!(log.batches[2].len(), 3);
    drop(log);
    for (rx, want) in receivers.iter_mut().zip(["aaaa", "bbbbbbbb", "cc"]) {
        assert_eq!(drain(rx).0, want);
    }
}

#[test]
fn a_request_joins_running_sequences_at_the_next_step() {
    let mut s = scheduler(2, 64);
    let (a, mut ra) = submission("aaaaaaaaaa", 100, &[]);
    s.admit(a).unwrap();
    s.step();
    s.step();
    let (b, mut rb) = submission("bb", 100, &[]);
    s.admit(b).unwrap();
    s.step();
    let log = s.runner().log.lock().unwrap();
    let last = log.batches.last().unwrap();
    assert_eq!(
        last.iter().filter(|e| e.seq == 0).count(),
        1,
        "the running stream keeps decoding"
    );
    assert_eq!(
        last.iter().filter(|e| e.seq == 1).count(),
        2,
        "the new prompt is prefilled alongside"
    );
    drop(log);
    run_until_idle(&mut s);
    assert_eq!(drain(&mut ra).0, "aaaaaaaaaa");
    assert_eq!(drain(&mut rb).0, "bb");
}

#[test]
fn long_prompts_are_chunked_to_the_batch_size_without_stalling_decodes() {
    let mut s = scheduler(2, 8);
    let (a, _ra) = submission("xy", 100, &[]);
    s.admit(a).unwrap();
    s.step(); // prefill a
    let long = "z".repeat(20);
    let (b, mut rb) = submission(&long, 100, &[]);
    s.admit(b).unwrap();
    let reports: Vec<(usize, usize)> = (0..3)
        .map(|_| s.step())
        .map(|r| (r.batch_tokens, r.prompt_tokens))
        .collect();
    // b's first sampled token is fed back: no prompt token left.
    let report = s.step();
    assert!(report.batch_tokens > 0);
    assert_eq!(report.prompt_tokens, 0);
    {
        let log = s.runner().log.lock().unwrap();
        for batch in &log.batches {
            assert!(batch.len() <= 8);
        }
        // a keeps decoding (1 token a step) while b prefills in chunks of 7.
        let b_chunks: Vec<usize> = log.batches[1..4]
            .iter()
            .map(|batch| batch.iter().filter(|e| e.seq == 1).count())
            .collect();
        assert_eq!(b_chunks, vec![7, 7, 6]);
        // Each report counts its batch's prompt tokens (b's chunk) apart from sampled ones (a's).
        let logged: Vec<(usize, usize)> = log.batches[1..]
            .iter()
            .zip(&b_chunks)
            .map(|(batch, &chunk)| (batch.len(), chunk))
            .collect();
        assert_eq!(reports, logged);
    }
    run_until_idle(&mut s);
    assert_eq!(drain(&mut rb).0, long);
}

#[test]
fn a_dropped_receiver_frees_its_slot_and_kv_at_the_next_step() {
    let mut s = scheduler(1, 64);
    let (a, ra) = submission("aaaaaaaaaaaaaaaaaaaa", 100, &[]);
    s.admit(a).unwrap();
    s.step();
    s.step();
    drop(ra);
    let report = s.step();
    assert_eq!(report.ended, vec![0]);
    assert_eq!(report.batch_tokens, 0);
    assert!(s.is_idle() && s.has_free_slot());
    assert_eq!(s.runner().log.lock().unwrap().ended, vec![0]);
}

#[test]
fn a_request_whose_client_left_while_queued_is_skipped() {
    let mut s = scheduler(1, 64);
    let (a, ra) = submission("abc", 100, &[]);
    drop(ra);
    s.admit(a).unwrap();
    assert!(s.is_idle());
    assert!(s.runner().log.lock().unwrap().begun.is_empty());
}

#[test]
fn a_prompt_that_fills_the_context_is_refused_not_decoded() {
    let mut s = Scheduler::new(FakeRunner::new(Duration::ZERO), 1, 64, 4);
    let (a, mut ra) = submission("abcd", 100, &[]);
    s.admit(a).unwrap();
    assert!(s.is_idle());
    assert!(matches!(ra.try_recv(), Ok(GenerationEvent::Failed(_))));
}

#[test]
fn generation_stops_at_the_sequence_context() {
    let mut s = Scheduler::new(FakeRunner::new(Duration::ZERO), 1, 64, 8);
    let (a, mut ra) = submission("abcde", 100, &[]);
    s.admit(a).unwrap();
    run_until_idle(&mut s);
    let (text, done) = drain(&mut ra);
    assert_eq!(text, "abc");
    assert!(matches!(
        done,
        Some(GenerationEvent::Done {
            reason: FinishReason::Length,
            ..
        })
    ));
    let log = s.runner().log.lock().unwrap();
    assert!(log.batches.iter().flatten().all(|e| e.pos < 8));
}

#[test]
fn eos_token_is_never_emitted_as_text() {
    let mut s = scheduler(1, 64);
    let (a, mut ra) = submission("a", 100, &[]);
    s.admit(a).unwrap();
    run_until_idle(&mut s);
    assert_eq!(drain(&mut ra).0, "a");
    let _ = FAKE_EOS;
}

fn done_stats(rx: &mut mpsc::Receiver<GenerationEvent>) -> (String, GenerationStats) {
    match drain(rx) {
        (text, Some(GenerationEvent::Done { stats, .. })) => (text, stats),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_shared_prefix_is_reused_and_only_the_divergent_suffix_is_removed() {
    let mut s = scheduler(1, 64);
    let (a, mut ra) = submission("hello world", 100, &[]);
    s.admit(a).unwrap();
    run_until_idle(&mut s);
    assert_eq!(done_stats(&mut ra).1.cached_tokens, 0);
    let batches_before = s.runner().log.lock().unwrap().batches.len();

    let (b, mut rb) = submission("hello there", 100, &[]);
    s.admit(b).unwrap();
    run_until_idle(&mut s);
    let (text, stats) = done_stats(&mut rb);
    assert_eq!(text, "hello there");
    assert_eq!((stats.cached_tokens, stats.prompt_tokens), (6, 11));
    let log = s.runner().log.lock().unwrap();
    assert_eq!(
        log.truncated,
        vec![(0, 6)],
        "cells from position 6 on were removed"
    );
    let prefill = &log.batches[batches_before];
    let positions: Vec<u32> = prefill.iter().map(|e| e.pos).collect();
    assert_eq!(
        positions,
        vec![6, 7, 8, 9, 10],
        "only `there` was prefilled"
    );
}

#[test]
fn an_identical_prompt_is_answered_from_the_kept_logits_without_a_decode() {
    let mut s = scheduler(1, 64);
    for expected_cached in [0, 5] {
        let batches_before = s.runner().log.lock().unwrap().batches.len();
        let (a, mut ra) = submission("abcde", 100, &[]);
        s.admit(a).unwrap();
        run_until_idle(&mut s);
        let (text, stats) = done_stats(&mut ra);
        assert_eq!(text, "abcde");
        assert_eq!(stats.cached_tokens, expected_cached);
        let log = s.runner().log.lock().unwrap();
        let first = log.batches[batches_before][0];
        assert_eq!(
            (first.pos, first.token),
            (expected_cached, Token::from(b'a')),
            "the first batch decodes the first uncached token"
        );
    }
    assert_eq!(s.runner().log.lock().unwrap().replayed, vec![(0, 5)]);
}

#[test]
fn kept_logits_answer_only_the_exact_prompt_they_follow() {
    let mut s = scheduler(1, 64);
    let mut run = |prompt: &str| {
        let (a, mut ra) = submission(prompt, 100, &[]);
        s.admit(a).unwrap();
        run_until_idle(&mut s);
        let (text, stats) = done_stats(&mut ra);
        assert_eq!(text, prompt);
        stats.cached_tokens
    };
    assert_eq!(run("abcde"), 0);
    // A prefix of the cached tokens, or the prompt and its answer's first token: the logits
    // after them were never kept, so the last prompt token is decoded again.
    assert_eq!(run("abcd"), 3);
    assert_eq!(run("abcdaa"), 5);
    // Kept after each of those: the same prompt again is answered from them.
    assert_eq!(run("abcdaa"), 6);
    // Cut below the tokens the row follows (`abcx…` keeps `abc`), the row is never used again
    // (the fake panics if it is), even once the same tokens are back.
    assert_eq!(run("abcxy"), 3);
    assert_eq!(run("abcdaa"), 3);
    assert_eq!(run("abcdaa"), 6);
    assert_eq!(
        s.runner().log.lock().unwrap().replayed,
        vec![(0, 6), (0, 6)]
    );
}

#[test]
fn a_conversation_resent_with_one_more_turn_prefills_only_the_new_part() {
    let mut s = scheduler(1, 64);
    let (a, mut ra) = submission("Q1:", 100, &[]);
    s.admit(a).unwrap();
    run_until_idle(&mut s);
    let (answer, _) = done_stats(&mut ra);
    // The KV now holds the prompt and the decoded answer.
    assert_eq!(s.cached_tokens(0).len(), 6);
    let follow_up = format!("Q1:{answer}Q2:");
    let (b, mut rb) = submission(&follow_up, 100, &[]);
    s.admit(b).unwrap();
    run_until_idle(&mut s);
    let (_, stats) = done_stats(&mut rb);
    assert_eq!(stats.cached_tokens, 6);
}

#[test]
fn the_idle_sequence_whose_cache_the_prompt_continues_is_chosen() {
    let mut s = scheduler(3, 64);
    let mut receivers = Vec::new();
    for prompt in ["aaaa1", "bbbb2", "cccc3"] {
        let (sub, rx) = submission(prompt, 100, &[]);
        s.admit(sub).unwrap();
        receivers.push(rx);
    }
    run_until_idle(&mut s);
    let held = s.cached_tokens(1).len();
    let next_turn: String = s
        .cached_tokens(1)
        .iter()
        .map(|&t| char::from(t as u8))
        .chain("X".chars())
        .collect();
    let (b, mut rb) = submission(&next_turn, 100, &[]);
    s.admit(b).unwrap();
    assert_eq!(*s.runner().log.lock().unwrap().begun.last().unwrap(), 1);
    run_until_idle(&mut s);
    assert_eq!(done_stats(&mut rb).1.cached_tokens as usize, held);
}

/// A system prompt of over `MIN_SHARED_PREFIX` tokens.
fn system_prompt() -> String {
    let system = "You are a careful assistant. ".repeat(4);
    assert!(system.len() > 4 * MIN_SHARED_PREFIX);
    system
}

#[test]
fn a_shared_system_prompt_is_computed_once_and_copied() {
    let mut s = scheduler(4, 512);
    let system = system_prompt();
    let mut receivers = Vec::new();
    for user in ["alpha", "bravo", "charlie", "delta"] {
        let (sub, rx) = submission(&format!("{system}{user}"), 1000, &[]);
        s.admit(sub).unwrap();
        receivers.push(rx);
    }
    run_until_idle(&mut s);
    for (rx, user) in receivers
        .iter_mut()
        .zip(["alpha", "bravo", "charlie", "delta"])
    {
        let (text, stats) = done_stats(rx);
        // The fake echoes the cells it holds: the copied ones are the right ones.
        assert_eq!(text, format!("{system}{user}"));
        let expected = if user == "alpha" {
            0
        } else {
            system.len() as u32
        };
        assert_eq!(stats.cached_tokens, expected, "{user}");
    }
    let log = s.runner().log.lock().unwrap();
    assert_eq!(
        log.copied,
        (1..4)
            .map(|seq| (0, seq, system.len() as u32))
            .collect::<Vec<_>>()
    );
    let prefilled_system: usize = log
        .batches
        .iter()
        .flatten()
        .filter(|e| (e.pos as usize) < system.len())
        .count();
    assert_eq!(
        prefilled_system,
        system.len(),
        "the system prompt's cells, once"
    );
}

#[test]
fn a_prompt_waits_for_an_earlier_prefill_of_the_same_prefix_but_decodes_never_wait() {
    let mut s = scheduler(3, 32);
    let system = system_prompt();
    // A stream decoding 40 tokens (its prompt takes two steps).
    let run = "r".repeat(40);
    let (running, mut r_running) = submission(&run, 1000, &[]);
    s.admit(running).unwrap();
    s.step();
    s.step();
    let (a, mut ra) = submission(&format!("{system}a"), 1000, &[]);
    let (b, mut rb) = submission(&format!("{system}b"), 1000, &[]);
    s.admit(a).unwrap();
    s.admit(b).unwrap();
    let steps_to_prefill_once = system.len().div_ceil(31);
    for _ in 0..steps_to_prefill_once {
        s.step();
        let log = s.runner().log.lock().unwrap();
        let batch = log.batches.last().unwrap();
        assert!(
            batch.iter().any(|e| e.seq == 0),
            "the running stream decodes"
        );
        assert!(
            batch.iter().all(|e| e.seq != 2),
            "b waits for a's cells: {batch:?}"
        );
    }
    run_until_idle(&mut s);
    assert_eq!(done_stats(&mut r_running).0, run);
    assert_eq!(done_stats(&mut ra).0, format!("{system}a"));
    let (text, stats) = done_stats(&mut rb);
    assert_eq!(text, format!("{system}b"));
    assert_eq!(stats.cached_tokens as usize, system.len());
}

#[test]
fn a_cache_the_prompt_only_partly_shares_is_copied_from_not_cut_short() {
    let mut s = scheduler(2, 512);
    let system = system_prompt();
    let (a, mut ra) = submission(&format!("{system}first question"), 1000, &[]);
    s.admit(a).unwrap();
    run_until_idle(&mut s);
    let (first, _) = done_stats(&mut ra);
    let (b, mut rb) = submission(&format!("{system}another question"), 1000, &[]);
    s.admit(b).unwrap();
    assert_eq!(
        *s.runner().log.lock().unwrap().begun.last().unwrap(),
        1,
        "the empty sequence, not the one holding the other conversation"
    );
    run_until_idle(&mut s);
    let (_, stats) = done_stats(&mut rb);
    assert_eq!(stats.cached_tokens as usize, system.len());
    let kept: Vec<Token> = first.bytes().map(Token::from).collect();
    assert_eq!(
        s.cached_tokens(0)[..kept.len()],
        kept[..],
        "seq 0 kept its conversation"
    );
}

#[test]
fn without_a_match_an_empty_sequence_is_used_then_the_least_recently_used_is_evicted() {
    let mut s = scheduler(2, 64);
    let (a, _ra) = submission("aaaa", 1000, &[]);
    s.admit(a).unwrap();
    run_until_idle(&mut s);
    let (b, _rb) = submission("bbbb", 1000, &[]);
    s.admit(b).unwrap();
    assert_eq!(
        *s.runner().log.lock().unwrap().begun.last().unwrap(),
        1,
        "the empty sequence first"
    );
    run_until_idle(&mut s);
    let (c, mut rc) = submission("cccc", 1000, &[]);
    s.admit(c).unwrap();
    {
        let log = s.runner().log.lock().unwrap();
        assert_eq!(
            *log.begun.last().unwrap(),
            0,
            "seq 0 was used least recently"
        );
        assert_eq!(log.truncated, vec![(0, 0)], "its whole cache was evicted");
    }
    run_until_idle(&mut s);
    assert_eq!(done_stats(&mut rc).0, "cccc");
    assert_eq!(
        s.cached_tokens(1)[..4],
        *b"bbbb".map(Token::from).as_slice()
    );
}

#[test]
fn prefill_budget_goes_to_the_shortest_remaining_prompt_first() {
    let mut s = scheduler(2, 8);
    let long = "L".repeat(20);
    let (a, _ra) = submission(&long, 1000, &[]);
    let (b, _rb) = submission("sssss", 1000, &[]);
    s.admit(a).unwrap();
    s.admit(b).unwrap();
    s.step();
    let log = s.runner().log.lock().unwrap();
    let first = &log.batches[0];
    assert_eq!(
        first.iter().filter(|e| e.seq == 1).count(),
        5,
        "the short prompt finishes prefill"
    );
    assert_eq!(
        first.iter().filter(|e| e.seq == 0).count(),
        3,
        "the long one takes the rest"
    );
}

#[test]
fn a_large_embedding_job_runs_one_decode_at_a_time_and_stops_when_its_client_goes() {
    let mut s = scheduler(1, 64);
    let (reply, mut rx) = tokio::sync::oneshot::channel();
    let job = crate::engine::EmbedJob {
        inputs: (0..130).map(|i| vec![i as Token % 200 + 1]).collect(),
        reply,
    };
    let mut progress = EmbedProgress::new(job);
    // The fake holds 64 inputs per decode: three steps, answered at the last.
    assert!(!s.embed_step(&mut progress));
    assert!(rx.try_recv().is_err());
    assert!(!s.embed_step(&mut progress));
    assert!(s.embed_step(&mut progress));
    let vectors = rx.try_recv().unwrap().unwrap();
    assert_eq!(vectors.len(), 130);
    // A client that left: nothing more is computed.
    let (reply, rx) = tokio::sync::oneshot::channel();
    let mut gone = EmbedProgress::new(crate::engine::EmbedJob {
        inputs: vec![vec![1]; 500],
        reply,
    });
    drop(rx);
    assert!(s.embed_step(&mut gone));
}

#[test]
fn a_short_shared_preamble_is_computed_alongside_not_waited_for() {
    let mut s = scheduler(2, 512);
    let preamble = "x".repeat(MIN_SHARED_PREFIX + 4);
    let (a, mut ra) = submission(&format!("{preamble}{}", "a".repeat(100)), 1000, &[]);
    let (b, mut rb) = submission(&format!("{preamble}{}", "b".repeat(50)), 1000, &[]);
    s.admit(a).unwrap();
    s.admit(b).unwrap();
    s.step();
    {
        let log = s.runner().log.lock().unwrap();
        assert!(
            log.batches[0].iter().any(|e| e.seq == 1),
            "the later, shorter prompt prefills at once, not after the earlier one"
        );
    }
    run_until_idle(&mut s);
    assert!(done_stats(&mut ra).0.ends_with('a'));
    assert!(done_stats(&mut rb).0.ends_with('b'));
}

#[test]
fn the_same_prompt_again_reuses_its_own_sequence_in_place() {
    let mut s = scheduler(2, 512);
    let prompt = format!("{}again", system_prompt());
    for expected_cached in [0, prompt.len() as u32] {
        let (a, mut ra) = submission(&prompt, 1000, &[]);
        s.admit(a).unwrap();
        run_until_idle(&mut s);
        assert_eq!(done_stats(&mut ra).1.cached_tokens, expected_cached);
    }
    let log = s.runner().log.lock().unwrap();
    assert_eq!(
        log.begun,
        vec![0, 0],
        "the sequence holding it, not the empty one"
    );
    assert!(log.copied.is_empty());
}

#[test]
fn prompts_are_prefilled_one_after_another_shortest_first() {
    let mut s = scheduler(3, 512);
    let prompts = ["a".repeat(70), "b".repeat(90), "c".repeat(80)];
    let mut receivers = Vec::new();
    for prompt in &prompts {
        let (sub, rx) = submission(prompt, 1000, &[]);
        s.admit(sub).unwrap();
        receivers.push(rx);
    }
    for _ in 0..3 {
        s.step();
    }
    let log = s.runner().log.lock().unwrap();
    let per_seq = |batch: &Vec<BatchEntry>| -> Vec<usize> {
        (0..3)
            .map(|seq| batch.iter().filter(|e| e.seq == seq).count())
            .collect()
    };
    // One prompt per step; each finished one decodes alongside the next one's prefill.
    assert_eq!(per_seq(&log.batches[0]), vec![70, 0, 0]);
    assert_eq!(per_seq(&log.batches[1]), vec![1, 0, 80]);
    assert_eq!(per_seq(&log.batches[2]), vec![1, 90, 1]);
}

#[test]
fn a_long_prompt_is_not_starved_by_short_ones_that_keep_arriving() {
    let mut s = scheduler(2, 128);
    let long = "L".repeat(240);
    let (a, mut ra) = submission(&long, 1, &[]);
    s.admit(a).unwrap();
    let mut short_receivers = Vec::new();
    let mut steps = 0;
    while s.cached_tokens(0).len() < long.len() {
        // A new short prompt whenever the other sequence is free: always one shorter than
        // what the long prompt has left.
        if s.has_free_slot() && !s.is_idle() {
            let first = char::from(b'a' + (short_receivers.len() % 26) as u8);
            let (b, rb) = submission(&format!("{first}{}", "s".repeat(69)), 1, &[]);
            s.admit(b).unwrap();
            short_receivers.push(rb);
        }
        s.step();
        steps += 1;
        assert!(steps <= 10, "the long prompt starved: {steps} steps");
    }
    assert!(short_receivers.len() >= 3, "short prompts were served too");
    run_until_idle(&mut s);
    assert_eq!(done_stats(&mut ra).0, "L");
}

#[test]
fn a_new_conversation_takes_an_idle_sequence_next_to_a_busy_one() {
    let mut s = scheduler(4, 512);
    // Four finished conversations: sequences 0..3 hold caches, 0 the least recently used.
    for c in ["w", "x", "y", "z"] {
        let (sub, mut rx) = submission(&c.repeat(8), 1, &[]);
        s.admit(sub).unwrap();
        run_until_idle(&mut s);
        done_stats(&mut rx);
    }
    // Sequence 2's conversation continues and stays busy.
    let (busy, _rb) = submission(&format!("{}yyyy", "y".repeat(9)), 1000, &[]);
    s.admit(busy).unwrap();
    s.step();
    // A new conversation: not sequence 0 (least recently used), but 1, beside the busy 2, so
    // one micro-batch holds both.
    let (new, _rn) = submission(&"n".repeat(8), 1000, &[]);
    s.admit(new).unwrap();
    assert_eq!(s.runner().log.lock().unwrap().begun[4..], [2, 1]);
}

#[test]
fn a_batch_is_ordered_by_sequence_so_consecutive_ids_share_a_micro_batch() {
    let mut s = scheduler(4, 512);
    // The short prompts of sequences 0, 1 and 3 go first (shortest first), 2's long one after.
    let mut receivers = Vec::new();
    for prompt in ["a", "b", &"c".repeat(100), "d"] {
        let (sub, rx) = submission(prompt, 1000, &[]);
        s.admit(sub).unwrap();
        receivers.push(rx);
    }
    s.step();
    let log = s.runner().log.lock().unwrap();
    let seqs: Vec<SeqId> = log.batches[0].iter().map(|e| e.seq).collect();
    assert_eq!(seqs.len(), 103);
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(seqs, sorted, "in sequence order");
    drop(log);
    run_until_idle(&mut s);
    // Each sequence was sampled from its own entries: the echoes are whole.
    for (rx, want) in receivers.iter_mut().zip(["a", "b", &"c".repeat(100), "d"]) {
        assert_eq!(drain(rx).0, want);
    }
}
