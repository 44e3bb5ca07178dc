//! End to end through `tessera serve --dtype float32` (one server for the file,
//! used by one test at a time): greedy answers equal Transformers' reference,
//! batching does not change them, SSE streams are well formed, the official
//! OpenAI Python client works, and a client that leaves mid-stream frees its
//! KV blocks.

mod common;

use std::time::{Duration, Instant};

use common::{cases, concurrent_requests_equal_solo_ones, token_ids, Shared};
use serde_json::{json, Value};

static SERVER: Shared = Shared::new(&["--dtype", "float32"]);

/// The reference ran exactly 32 tokens with EOS neither stopping nor
/// suppressed: that is greedy with `ignore_eos`.
#[test]
fn greedy_generate_reproduces_the_transformers_reference() {
    let server = SERVER.lock();
    let http = &server.http;
    let info = http.get("/info").json::<Value>().unwrap();
    assert_eq!(info["model_dtype"], "float32", "{info}");
    for case in cases() {
        let name = &case.name;
        // The router tokenizes the raw prompt as Transformers did (no BOS).
        let tokens = http.ok_json("/tokenize", &json!({"inputs": case.prompt}));
        let tokenized: Vec<u64> = tokens
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect();
        assert_eq!(tokenized, case.prompt_ids, "{name}: /tokenize");

        let answer = http.ok_json(
            "/generate",
            &json!({"inputs": case.prompt, "parameters": {
                "max_new_tokens": 32, "details": true, "decoder_input_details": true,
                "ignore_eos": true, "do_sample": false}}),
        );
        let details = &answer["details"];
        let prefill: Vec<u64> = details["prefill"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect();
        assert_eq!(prefill, case.prompt_ids, "{name}: details.prefill");
        assert_eq!(token_ids(details), case.generated_ids, "{name}: tokens");
        assert_eq!(details["finish_reason"], "length", "{name}");
        assert_eq!(details["generated_tokens"], 32, "{name}");
        let text = answer["generated_text"].as_str().unwrap();
        let tokens_text: String = details["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["text"].as_str().unwrap())
            .collect();
        // Where the reference has special tokens (EOS/BOS under ignore_eos), the
        // text is checked by `generated_text_leaves_out_special_tokens`.
        if !details["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["special"] == true)
        {
            assert_eq!(text, tokens_text, "{name}: generated_text vs token texts");
            assert_eq!(text, case.generated_text, "{name}: generated_text");
        }
    }
}

/// Special tokens of the default model, as they would appear in text.
const SPECIAL_TEXTS: [&str; 3] = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"];

fn strip_specials(text: &str) -> String {
    SPECIAL_TEXTS
        .iter()
        .fold(text.to_string(), |t, special| t.replace(special, ""))
}

/// As TGI and OpenAI servers do (`skip_special_tokens`): the EOS that ends a
/// generation, and special tokens generated under `ignore_eos`, are not text.
#[test]
fn generated_text_leaves_out_special_tokens() {
    let server = SERVER.lock();
    let http = &server.http;
    let mut failures = Vec::new();
    let mut check = |what: &str, text: &str| {
        if SPECIAL_TEXTS.iter().any(|s| text.contains(s)) {
            failures.push(format!("{what}: {text:?}"));
        }
    };
    let france = "The capital of France is";
    // Greedy ends at EOS after 30 tokens; with ignore_eos it goes on past EOS and BOS.
    for ignore_eos in [false, true] {
        let answer = http.ok_json(
            "/generate",
            &json!({"inputs": france, "parameters": {
                "max_new_tokens": 32, "details": true, "ignore_eos": ignore_eos}}),
        );
        let expected_reason = if ignore_eos { "length" } else { "eos_token" };
        assert_eq!(
            answer["details"]["finish_reason"], expected_reason,
            "{answer}"
        );
        check(
            &format!("/generate ignore_eos={ignore_eos}"),
            answer["generated_text"].as_str().unwrap(),
        );
        let answer = http.ok_json(
            "/v1/completions",
            &json!({"prompt": france, "max_tokens": 32, "temperature": 0, "ignore_eos": ignore_eos}),
        );
        check(
            &format!("/v1/completions ignore_eos={ignore_eos}"),
            answer["choices"][0]["text"].as_str().unwrap(),
        );
    }
    let answer = http.ok_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32, "temperature": 0}),
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    check(
        "/v1/chat/completions",
        answer["choices"][0]["message"]["content"].as_str().unwrap(),
    );
    assert!(
        failures.is_empty(),
        "special tokens in generated text:\n{}",
        failures.join("\n")
    );
}

#[test]
fn greedy_openai_completions_reproduce_the_reference_text() {
    let server = SERVER.lock();
    let http = &server.http;
    for case in cases() {
        let name = &case.name;
        let answer = http.ok_json(
            "/v1/completions",
            &json!({"model": "tessera", "prompt": case.prompt, "max_tokens": 32,
                "temperature": 0, "ignore_eos": true}),
        );
        assert_eq!(answer["object"], "text_completion", "{name}: {answer}");
        let choices = answer["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 1, "{name}: {answer}");
        assert_eq!(choices[0]["index"], 0);
        assert_eq!(choices[0]["finish_reason"], "length", "{name}: {answer}");
        // The reference decoded with special tokens; OpenAI (and vLLM) outputs leave them out.
        let expected = ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]
            .iter()
            .fold(case.generated_text.clone(), |text, special| {
                text.replace(special, "")
            });
        assert_eq!(
            choices[0]["text"].as_str().unwrap(),
            expected,
            "{name}: text"
        );
        let usage = &answer["usage"];
        assert_eq!(usage["prompt_tokens"], case.prompt_ids.len(), "{name}");
        assert_eq!(usage["completion_tokens"], 32, "{name}");
        assert_eq!(usage["total_tokens"], case.prompt_ids.len() + 32, "{name}");
    }
}

#[test]
fn logit_bias_bans_and_forces_tokens() {
    let server = SERVER.lock();
    let http = &server.http;
    let complete = |extra: Value| {
        let mut body = json!({"prompt": "The capital of France is", "max_tokens": 3,
            "temperature": 0, "logprobs": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        http.ok_json("/v1/completions", &body)
    };
    let ids_of = |answer: &Value| -> Vec<u64> {
        let text = answer["choices"][0]["text"].as_str().unwrap().to_string();
        let tokens = http.ok_json("/tokenize", &json!({"inputs": text}));
        tokens
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect()
    };
    let plain = complete(json!({}));
    assert_eq!(plain["choices"][0]["text"], " Paris.\n", "{plain}");
    let paris = ids_of(&plain)[0];

    // -100 on " Paris" makes greedy decoding take another first token; the
    // logprob reported for it is still the model's.
    let banned = complete(json!({"logit_bias": {paris.to_string(): -100}}));
    let text = banned["choices"][0]["text"].as_str().unwrap();
    assert!(!text.starts_with(" Paris"), "{banned}");
    let logprob = banned["choices"][0]["logprobs"]["token_logprobs"][0]
        .as_f64()
        .unwrap();
    assert!(logprob < 0.0 && logprob > -30.0, "{banned}");

    // +100 on a token makes it the only choice at every step, sampling or not.
    let forced = http.ok_json("/tokenize", &json!({"inputs": " banana"}));
    let banana = forced[0]["id"].as_u64().unwrap();
    for temperature in [0.0, 1.0] {
        let answer = complete(json!({"logit_bias": {banana.to_string(): 100},
            "temperature": temperature, "seed": 3}));
        assert_eq!(
            answer["choices"][0]["text"], " banana banana banana",
            "temperature {temperature}: {answer}"
        );
    }
    // The chat route takes it too.
    let chat = http.ok_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "temperature": 0, "logit_bias": {banana.to_string(): 100}}),
    );
    assert_eq!(
        chat["choices"][0]["message"]["content"], " banana banana",
        "{chat}"
    );
}

/// Prompt scoring: TGI's `decoder_input_details` and OpenAI's `echo` with `logprobs`
/// (and `max_tokens: 0`, as evaluation harnesses send it) give each prompt token the
/// model's log-probability, which for a greedy continuation appended to the prompt
/// equals what generating it reported; a prefix already cached changes nothing.
#[test]
fn prompt_tokens_are_scored_like_the_tokens_generated() {
    let server = SERVER.lock();
    let http = &server.http;
    let generated = http.ok_json(
        "/generate",
        &json!({"inputs": format!("{}Water boils at", "The sky is blue and the grass is green. ".repeat(4)),
            "parameters": {"max_new_tokens": 6,
            "details": true, "decoder_input_details": true}}),
    );
    let details = &generated["details"];
    let prefill = details["prefill"].as_array().unwrap();
    assert!(prefill[0]["logprob"].is_null(), "{generated}");
    assert!(prefill[1..]
        .iter()
        .all(|t| t["logprob"].as_f64().unwrap() < 0.0));
    let mut ids: Vec<u64> = prefill.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    let prompt_len = ids.len();
    assert!(
        prompt_len > 32,
        "long enough for the prefix cache: {prompt_len}"
    );
    let tokens = details["tokens"].as_array().unwrap();
    ids.extend(tokens.iter().map(|t| t["id"].as_u64().unwrap()));

    for round in 0..2 {
        // The second round finds the prompt's blocks in the prefix cache.
        let scored = http.ok_json(
            "/v1/completions",
            &json!({"prompt": ids, "max_tokens": 0, "echo": true, "logprobs": 2}),
        );
        let choice = &scored["choices"][0];
        assert_eq!(choice["finish_reason"], "length", "{scored}");
        assert_eq!(scored["usage"]["completion_tokens"], 0, "{scored}");
        assert_eq!(scored["usage"]["prompt_tokens"], ids.len(), "{scored}");
        let lp = &choice["logprobs"];
        let token_logprobs = lp["token_logprobs"].as_array().unwrap();
        assert_eq!(token_logprobs.len(), ids.len(), "round {round}: {scored}");
        assert!(token_logprobs[0].is_null() && lp["top_logprobs"][0].is_null());
        let texts: String = lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(texts, choice["text"].as_str().unwrap(), "round {round}");
        for (i, t) in prefill.iter().enumerate().skip(1) {
            let (got, want) = (
                token_logprobs[i].as_f64().unwrap(),
                t["logprob"].as_f64().unwrap(),
            );
            assert!(
                (got - want).abs() < 1e-4,
                "round {round}: prompt token {i}: {got} vs {want}"
            );
        }
        for (j, t) in tokens.iter().enumerate() {
            let got = token_logprobs[prompt_len + j].as_f64().unwrap();
            let want = t["logprob"].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-3,
                "round {round}: generated token {j} scored {got}, generated at {want}"
            );
            // Greedy: the token was the most likely one there.
            let top = lp["top_logprobs"][prompt_len + j].as_object().unwrap();
            let best = top
                .values()
                .map(|v| v.as_f64().unwrap())
                .fold(f64::MIN, f64::max);
            assert!((best - got).abs() < 1e-3, "round {round}: {top:?} vs {got}");
        }
    }
    // Streamed, the echoed prompt comes first with the same logprobs.
    let events = http
        .stream(
            "/v1/completions",
            &json!({"prompt": ids, "max_tokens": 2, "echo": true, "logprobs": 1,
                "stream": true, "temperature": 0}),
        )
        .collect();
    let chunks = openai_chunks(events);
    let first = &chunks[0]["choices"][0];
    let streamed = first["logprobs"]["token_logprobs"].as_array().unwrap();
    assert_eq!(streamed.len(), ids.len(), "{first}");
    assert!(streamed[0].is_null());
    for (i, t) in prefill.iter().enumerate().skip(1) {
        let (got, want) = (
            streamed[i].as_f64().unwrap(),
            t["logprob"].as_f64().unwrap(),
        );
        assert!(
            (got - want).abs() < 1e-4,
            "streamed prompt token {i}: {got} vs {want}"
        );
    }
    assert!(
        first["text"]
            .as_str()
            .unwrap()
            .starts_with("The sky is blue"),
        "{first}"
    );
    // TGI refuses it when streaming, as TGI does.
    let (status, error) = http.post_json(
        "/generate_stream",
        &json!({"inputs": "Hi", "parameters": {"decoder_input_details": true}}),
    );
    assert_eq!(status, 422, "{error}");
    assert!(error["error"]
        .as_str()
        .unwrap()
        .contains("decoder_input_details"));
}

/// JSON mode (`response_format: {"type": "json_object"}`): every answer that ends
/// by itself is one JSON object, greedy or sampled, streamed or not.
#[test]
fn json_mode_answers_are_json_objects() {
    let server = SERVER.lock();
    let http = &server.http;
    let ask = |content: &str, extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": content}],
            "max_tokens": 160, "response_format": {"type": "json_object"}});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let check = |answer: &str, finish: &str, what: &str| -> bool {
        if finish != "stop" {
            return false;
        }
        let value: Value = serde_json::from_str(answer)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {answer:?}"));
        assert!(value.is_object(), "{what}: {answer}");
        true
    };
    let mut closed = 0;
    for (i, question) in [
        "Describe a cat with a name and an age.",
        "List three fruits.",
        "What is the capital of France?",
    ]
    .iter()
    .enumerate()
    {
        let greedy = http.ok_json(
            "/v1/chat/completions",
            &ask(question, json!({"temperature": 0})),
        );
        let choice = &greedy["choices"][0];
        let text = choice["message"]["content"].as_str().unwrap();
        closed += check(text, choice["finish_reason"].as_str().unwrap(), question) as usize;
        // Streamed, the same answer.
        let events = http
            .stream(
                "/v1/chat/completions",
                &ask(question, json!({"temperature": 0, "stream": true})),
            )
            .collect();
        let streamed: String = openai_chunks(events)
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        assert_eq!(streamed, text, "{question}: streamed");
        // Sampled.
        let sampled = http.ok_json(
            "/v1/chat/completions",
            &ask(question, json!({"temperature": 1.0, "seed": i, "n": 2})),
        );
        for choice in sampled["choices"].as_array().unwrap() {
            let text = choice["message"]["content"].as_str().unwrap();
            closed += check(text, choice["finish_reason"].as_str().unwrap(), question) as usize;
        }
    }
    assert!(
        closed >= 5,
        "only {closed} of 9 answers closed their object"
    );
    // TGI's grammar for any JSON object is the same mode.
    let tgi = http.ok_json(
        "/generate",
        &json!({"inputs": concat!(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by ",
            "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?",
            "<|im_end|>\n<|im_start|>assistant\n"),
            "parameters": {"max_new_tokens": 160, "details": true,
                "grammar": {"type": "json", "value": {"type": "object"}}}}),
    );
    assert_eq!(tgi["details"]["finish_reason"], "eos_token", "{tgi}");
    let text = tgi["generated_text"].as_str().unwrap();
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(value.is_object(), "{text}");
}

/// 32 greedy requests of different prompt lengths and budgets.
#[test]
fn concurrent_greedy_requests_equal_solo_ones_and_finish_sooner() {
    let server = SERVER.lock();
    let (sequential, concurrent) = concurrent_requests_equal_solo_ones(&server.http);
    assert!(
        concurrent < sequential,
        "batching did not help: 32 requests at once took {concurrent:?}, one after another {sequential:?}"
    );
}

/// Parses every event of a TGI stream and checks its shape; returns the events.
fn tgi_events(events: &[String]) -> Vec<Value> {
    assert!(!events.is_empty(), "empty stream");
    let parsed: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("event {e:?}: {err}")))
        .collect();
    let last = parsed.len() - 1;
    for (i, event) in parsed.iter().enumerate() {
        assert!(event.get("error").is_none(), "error event: {event}");
        assert_eq!(event["index"], i + 1, "{event}");
        let token = &event["token"];
        assert!(token["id"].is_u64() && token["text"].is_string(), "{event}");
        assert!(
            token["logprob"].is_number() && token["special"].is_boolean(),
            "{event}"
        );
        if i < last {
            assert!(event["generated_text"].is_null(), "{event}");
            assert!(event["details"].is_null(), "{event}");
        }
    }
    parsed
}

#[test]
fn tgi_stream_is_well_formed_and_matches_generate() {
    let server = SERVER.lock();
    let http = &server.http;
    for (prompt, parameters) in [
        (
            "Here is a shopping list:\n1. Apples\n2. Bread\n3.",
            json!({"max_new_tokens": 20}),
        ),
        // Ends at EOS (token 30 of the reference is <|im_end|>).
        ("The capital of France is", json!({"max_new_tokens": 40})),
        // Ends at a stop sequence.
        (
            "Question: What is 12 plus 30?\nAnswer:",
            json!({"max_new_tokens": 30, "stop": ["answer"]}),
        ),
    ] {
        let body = json!({"inputs": prompt, "parameters": parameters});
        let events = tgi_events(&http.stream("/generate_stream", &body).collect());
        let last = events.last().unwrap();
        let details = &last["details"];
        let finish = details["finish_reason"].as_str().unwrap();
        assert!(
            ["length", "eos_token", "stop_sequence"].contains(&finish),
            "{last}"
        );
        assert_eq!(details["generated_tokens"], events.len(), "{last}");
        assert!(details["input_length"].as_u64().unwrap() > 0, "{last}");
        let generated_text = last["generated_text"].as_str().unwrap();
        let concatenated: String = events
            .iter()
            .filter(|e| !e["token"]["special"].as_bool().unwrap())
            .map(|e| e["token"]["text"].as_str().unwrap())
            .collect();
        // Special tokens in generated_text are `generated_text_leaves_out_special_tokens`'s.
        assert_eq!(
            concatenated,
            strip_specials(generated_text),
            "{prompt:?}: token texts vs generated_text"
        );

        // The same request without streaming: same tokens, text and reason.
        let mut whole = body.clone();
        whole["parameters"]["details"] = json!(true);
        let answer = http.ok_json("/generate", &whole);
        assert_eq!(answer["generated_text"], generated_text, "{prompt:?}");
        assert_eq!(answer["details"]["finish_reason"], finish, "{prompt:?}");
        let streamed: Vec<u64> = events
            .iter()
            .map(|e| e["token"]["id"].as_u64().unwrap())
            .collect();
        assert_eq!(token_ids(&answer["details"]), streamed, "{prompt:?}");

        // TGI's compatibility route streams the same events.
        let mut compat = body.clone();
        compat["stream"] = json!(true);
        let again = tgi_events(&http.stream("/", &compat).collect());
        assert_eq!(again.last().unwrap()["generated_text"], generated_text);
    }
}

/// Splits an OpenAI stream into its JSON chunks, checking that it ends with
/// `[DONE]` and nothing after.
fn openai_chunks(events: Vec<String>) -> Vec<Value> {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "the stream must end with data: [DONE]: {events:?}"
    );
    events[..events.len() - 1]
        .iter()
        .map(|e| {
            let chunk: Value =
                serde_json::from_str(e).unwrap_or_else(|err| panic!("chunk {e:?}: {err}"));
            assert!(chunk.get("error").is_none(), "error chunk: {chunk}");
            chunk
        })
        .collect()
}

/// Checks chunks of one choice: the text they carry, the finish reason (in
/// exactly one chunk, the last with choices) and the usage chunk.
fn check_openai_stream(
    chunks: &[Value],
    object: &str,
    text_of: impl Fn(&Value) -> Option<String>,
) -> (String, String, Value) {
    assert!(chunks.len() >= 2, "{chunks:?}");
    let id = chunks[0]["id"].as_str().unwrap().to_string();
    let (usage_chunk, chunks) = chunks.split_last().unwrap();
    let mut text = String::new();
    let mut finish = None;
    for chunk in chunks {
        assert_eq!(chunk["object"], object, "{chunk}");
        assert_eq!(chunk["id"], id.as_str(), "one id per stream: {chunk}");
        assert!(
            chunk["created"].is_u64() && chunk["model"].is_string(),
            "{chunk}"
        );
        assert!(
            chunk["usage"].is_null(),
            "usage only in the last chunk: {chunk}"
        );
        let choices = chunk["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 1, "{chunk}");
        let choice = &choices[0];
        assert_eq!(choice["index"], 0, "{chunk}");
        assert!(finish.is_none(), "a chunk after the finish reason: {chunk}");
        if let Some(piece) = text_of(choice) {
            text.push_str(&piece);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    let finish = finish.expect("no chunk had a finish_reason");
    assert_eq!(usage_chunk["object"], object, "{usage_chunk}");
    assert_eq!(
        usage_chunk["choices"].as_array().map(Vec::len),
        Some(0),
        "the usage chunk has no choices: {usage_chunk}"
    );
    let usage = usage_chunk["usage"].clone();
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap(),
        "{usage}"
    );
    (text, finish, usage)
}

/// The streamed usage of a request sent again: the same counts, except that more of
/// the prompt may now come from the prefix cache (the first request put it there).
fn assert_same_usage(again: &Value, first: &Value) {
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(again[field], first[field], "{field}: {again} vs {first}");
    }
    let cached = |u: &Value| u["prompt_tokens_details"]["cached_tokens"].as_u64();
    assert!(
        cached(again).is_some() && cached(again) >= cached(first),
        "cached tokens: {again} vs {first}"
    );
}

#[test]
fn openai_chat_stream_is_well_formed_and_matches_the_answer() {
    let server = SERVER.lock();
    let http = &server.http;
    let body = json!({"model": "x", "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24, "temperature": 0});
    let answer = http.ok_json("/v1/chat/completions", &body);
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    let message = &answer["choices"][0]["message"];
    assert_eq!(message["role"], "assistant", "{answer}");
    let content = message["content"].as_str().unwrap();
    assert!(!content.is_empty(), "{answer}");

    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let chunks = openai_chunks(http.stream("/v1/chat/completions", &streaming).collect());
    assert_eq!(
        chunks[0]["choices"][0]["delta"]["role"], "assistant",
        "the first chunk names the role: {}",
        chunks[0]
    );
    let (text, finish, usage) = check_openai_stream(&chunks, "chat.completion.chunk", |c| {
        c["delta"]["content"].as_str().map(str::to_string)
    });
    assert_eq!(
        text,
        strip_specials(content),
        "streamed deltas vs the non-streaming answer"
    );
    assert_eq!(finish, answer["choices"][0]["finish_reason"]);
    assert_same_usage(&usage, &answer["usage"]);

    // Without include_usage there is no usage chunk.
    streaming["stream_options"] = json!({"include_usage": false});
    let chunks = openai_chunks(http.stream("/v1/chat/completions", &streaming).collect());
    assert!(
        chunks
            .iter()
            .all(|c| !c["choices"].as_array().unwrap().is_empty()),
        "{chunks:?}"
    );
}

#[test]
fn openai_completion_stream_is_well_formed_and_matches_the_answer() {
    let server = SERVER.lock();
    let http = &server.http;
    for (prompt, max_tokens, ignore_eos) in [
        (
            "Il était une fois, dans un petit village au bord de la mer,",
            24,
            false,
        ),
        // Greedy emits EOS and BOS on the way (tokens 30 and 32 of the reference).
        ("The capital of France is", 32, true),
    ] {
        let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": ignore_eos});
        let answer = http.ok_json("/v1/completions", &body);
        let expected = answer["choices"][0]["text"].as_str().unwrap();

        let mut streaming = body.clone();
        streaming["stream"] = json!(true);
        streaming["stream_options"] = json!({"include_usage": true});
        let chunks = openai_chunks(http.stream("/v1/completions", &streaming).collect());
        let (text, finish, usage) = check_openai_stream(&chunks, "text_completion", |c| {
            c["text"].as_str().map(str::to_string)
        });
        assert_eq!(
            text,
            strip_specials(expected),
            "{prompt:?}: streamed text vs the non-streaming answer"
        );
        assert_eq!(finish, answer["choices"][0]["finish_reason"], "{prompt:?}");
        assert_same_usage(&usage, &answer["usage"]);
    }
}

#[test]
fn official_openai_python_client_completes_chats() {
    let server = SERVER.lock();
    let root = common::repo_root();
    let python = root.join(".deps/venv-client/bin/python");
    assert!(
        python.is_file(),
        "{} missing: run ./scripts/setup.sh",
        python.display()
    );
    let started = Instant::now();
    let out = std::process::Command::new(&python)
        .arg(root.join("tests/python/openai_client.py"))
        .arg(format!("{}/v1", server.http.base))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client failed ({:?})\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    eprintln!("openai client ({:?}): {report}", started.elapsed());
    let text = report["text"].as_str().unwrap();
    assert!(!text.is_empty(), "{report}");
    assert_eq!(report["stream_text"], strip_specials(text), "{report}");
    let info = server.http.get("/info").json::<Value>().unwrap();
    assert_eq!(report["models"], json!([info["model_id"]]), "{report}");
}

#[test]
fn client_leaving_mid_stream_frees_its_kv_blocks() {
    let server = SERVER.lock();
    let http = &server.http;
    let used = |http: &common::Http| http.metric("tessera_kv_cache_blocks_used");
    let body = json!({"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 1000, "ignore_eos": true}});
    let mut stream = http.stream("/generate_stream", &body);
    for _ in 0..3 {
        let event = stream.next_event().unwrap().expect("an event");
        let event: Value = serde_json::from_str(&event).unwrap();
        assert!(event["generated_text"].is_null(), "{event}");
    }
    // Nothing else runs (the lock): the blocks in use are this request's.
    let held = used(http);
    assert!(held > 0.0, "a running request holds KV blocks: {held}");
    drop(stream);
    let started = Instant::now();
    let mut last = held;
    while last != 0.0 && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        last = used(http);
    }
    assert_eq!(
        last,
        0.0,
        "tessera_kv_cache_blocks_used still {last} (was {held} while streaming) 5 s after the client left \
         (tessera_batch_current_size {})",
        http.metric("tessera_batch_current_size")
    );
    eprintln!("blocks freed {:?} after the disconnect", started.elapsed());
    assert_eq!(http.metric("tessera_batch_current_size"), 0.0);
    // And the server goes on serving.
    let answer = http.ok_json(
        "/generate",
        &json!({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 2}}),
    );
    assert_eq!(answer["generated_text"], " Paris.");
}

#[test]
fn kv_blocks_gauge_returns_to_zero_when_requests_finish() {
    let server = SERVER.lock();
    let http = &server.http;
    let answer = http.ok_json(
        "/generate",
        &json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 40, "ignore_eos": true}}),
    );
    assert!(!answer["generated_text"].as_str().unwrap().is_empty());
    // Nothing else runs (the lock): every block is free once the answer is out.
    let started = Instant::now();
    let mut last = -1.0;
    while last != 0.0 && started.elapsed() < Duration::from_secs(5) {
        last = http.metric("tessera_kv_cache_blocks_used");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        (last, http.metric("tessera_batch_current_size")),
        (0.0, 0.0),
        "(tessera_kv_cache_blocks_used, tessera_batch_current_size) 5 s after the only request finished"
    );
}

#[test]
fn a_client_leaving_counts_as_one_cancelled_request() {
    let server = SERVER.lock();
    let http = &server.http;
    let cancelled = |http: &common::Http| {
        let text = http.get("/metrics").text().unwrap();
        common::metric_value(&text, "tessera_requests_total{outcome=\"cancelled\"}").unwrap_or(0.0)
    };
    let before = cancelled(http);
    let body = json!({"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 1000, "ignore_eos": true}});
    let mut stream = http.stream("/generate_stream", &body);
    stream.next_event().unwrap().expect("an event");
    drop(stream);
    let started = Instant::now();
    let mut after = before;
    while after == before && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        after = cancelled(http);
    }
    // Let any second count land before judging.
    std::thread::sleep(Duration::from_millis(500));
    after = cancelled(http);
    assert_eq!(
        after - before,
        1.0,
        "tessera_requests_total{{outcome=\"cancelled\"}} went from {before} to {after} for one client that left"
    );
}

/// Prefix caching, as a chat's next turn resends the conversation so far: the same
/// long prompt sent again reuses the cached keys and values of its full blocks
/// (`tessera_prefix_cache_hits_tokens_total` grows by them, and OpenAI's
/// `usage.prompt_tokens_details.cached_tokens` reports them) and answers token for
/// token as the first time; reference prompts sent again still give Transformers'
/// continuations.
#[test]
fn a_repeated_prompt_reuses_its_cached_prefix_with_the_same_answer() {
    let server = SERVER.lock();
    let http = &server.http;
    let prompt = format!(
        "{}\nUser: Which of these cities lies furthest north?\nAssistant:",
        "Zanzibar, Quito, Oslo and Perth are cities that a travel quiz asks about. ".repeat(6)
    );
    let n_prompt = http
        .ok_json("/tokenize", &json!({"inputs": prompt}))
        .as_array()
        .unwrap()
        .len();
    let block = 16;
    let shareable = (n_prompt - 1) / block * block;
    assert!(
        shareable >= 64,
        "a prompt of {n_prompt} tokens spans several blocks"
    );
    let body = json!({"inputs": prompt, "parameters": {
        "max_new_tokens": 24, "details": true, "ignore_eos": true, "do_sample": false}});
    let hits = || http.metric("tessera_prefix_cache_hits_tokens_total");
    let first = http.ok_json("/generate", &body);
    let before = hits();
    let second = http.ok_json("/generate", &body);
    let after = hits();
    assert_eq!(
        token_ids(&second["details"]),
        token_ids(&first["details"]),
        "the cached prefix changed the answer"
    );
    assert_eq!(second["generated_text"], first["generated_text"]);
    assert!(
        after - before >= shareable as f64,
        "prefix cache hits grew by {} tokens, want at least {shareable}",
        after - before
    );
    // OpenAI's usage reports them too.
    let completion = http.ok_json(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0}),
    );
    let usage = &completion["usage"];
    assert_eq!(usage["prompt_tokens"], n_prompt, "{usage}");
    assert!(
        usage["prompt_tokens_details"]["cached_tokens"].as_u64() >= Some(shareable as u64),
        "{usage}"
    );
    for case in cases() {
        for pass in 0..2 {
            let answer = http.ok_json(
                "/generate",
                &json!({"inputs": case.prompt, "parameters": {
                    "max_new_tokens": 32, "details": true, "ignore_eos": true,
                    "do_sample": false}}),
            );
            assert_eq!(
                token_ids(&answer["details"]),
                case.generated_ids,
                "{}: pass {pass}",
                case.name
            );
        }
    }
}
