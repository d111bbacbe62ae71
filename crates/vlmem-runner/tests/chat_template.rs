//! Chat templates as Qwen3-VL users expect them: the released Instruct template (bundled
//! and built in) renders conversations of several turns with images anywhere in a user turn,
//! its ids match transformers' for the fixture's chat prompt, a checkpoint folder's own
//! template is found where transformers finds it, and a bad template is a typed error.

mod common;

use common::fixture_dir;
use sha2::{Digest, Sha256};
use std::fs;
use std::path::Path;
use vlmem_qwen3vl::Qwen3VlConfig;
use vlmem_runner::chat::{QWEN3_VL_CHAT_TEMPLATE, TemplateOrigin, expand_image_pads};
use vlmem_runner::preprocess::{PreprocessConfig, load_image, preprocess};
use vlmem_runner::prompt::{ChatTokenizer, IMAGE_PAD, chat_template};
use vlmem_runner::{ChatTemplate, Message, Part, Role, Runner, RunnerError};

/// SHA-256 and length of the released Qwen3-VL Instruct chat template (the `chat_template`
/// string of the checkpoints' chat_template.json, which the GGUF conversions carry as
/// `tokenizer.chat_template` unchanged).
const RELEASED_SHA256: &str = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4";
const RELEASED_BYTES: usize = 5292;

fn config(dir: &Path) -> Qwen3VlConfig {
    Qwen3VlConfig::from_file(&dir.join("config.json")).unwrap()
}

fn tokenizer(dir: &Path) -> ChatTokenizer {
    ChatTokenizer::from_file(&dir.join("tokenizer.json"), &config(dir)).unwrap()
}

/// reference.json's `chat_prompt`: the user text and transformers' ids.
fn reference_chat_prompt(dir: &Path) -> (String, Vec<u32>) {
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let chat = &json["chat_prompt"];
    let ids = chat["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
        .collect();
    (chat["user_text"].as_str().unwrap().to_string(), ids)
}

/// The image tokens of the fixture's image0.png, as the runner's preprocessor counts them.
fn image0_tokens(dir: &Path) -> usize {
    let pre = PreprocessConfig::for_vision(&config(dir).vision);
    let img = preprocess(&load_image(&dir.join("image0.png")).unwrap(), &pre).unwrap();
    img.num_tokens(pre.merge_size)
}

/// A folder holding the dense fixture's tokenizer and config, and no chat template.
fn bare_folder() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        fs::copy(fixture_dir("qwen3-vl-tiny").join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn bad_request(r: Result<impl std::fmt::Debug, RunnerError>) -> String {
    match r {
        Err(RunnerError::BadRequest(msg)) => msg,
        other => panic!("expected a BadRequest, got {other:?}"),
    }
}

#[test]
fn the_built_in_template_is_the_released_qwen3_vl_one() {
    assert_eq!(QWEN3_VL_CHAT_TEMPLATE.len(), RELEASED_BYTES);
    assert_eq!(
        hex(&Sha256::digest(QWEN3_VL_CHAT_TEMPLATE.as_bytes())),
        RELEASED_SHA256
    );
    let builtin = ChatTemplate::builtin();
    assert_eq!(builtin.origin(), &TemplateOrigin::BuiltIn);
    assert_eq!(builtin.source(), QWEN3_VL_CHAT_TEMPLATE);
    // The bundled chat_template.json files hold the same text, in Hugging Face's layout.
    for name in ["qwen3-vl-tiny", "qwen3-vl-tiny-released-layout"] {
        let path = fixture_dir(name).join("chat_template.json");
        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            json["chat_template"].as_str().unwrap(),
            QWEN3_VL_CHAT_TEMPLATE,
            "{name}"
        );
    }
}

#[test]
fn released_template_gives_the_reference_chat_prompt_ids() {
    for name in ["qwen3-vl-tiny", "qwen3-vl-tiny-released-layout"] {
        let dir = fixture_dir(name);
        let tok = tokenizer(&dir);
        let template = tok.chat_template().unwrap();
        assert_eq!(
            template.origin(),
            &TemplateOrigin::File(dir.join("chat_template.json")),
            "{name}"
        );
        let (user_text, want) = reference_chat_prompt(&dir);
        let messages = [Message::user(vec![
            Part::Image,
            Part::Text(user_text.clone()),
        ])];
        assert_eq!(
            template.render(&messages, true).unwrap(),
            format!(
                "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{user_text}\
                 <|im_end|>\n<|im_start|>assistant\n"
            )
        );
        let n = image0_tokens(&dir);
        assert_eq!(n, 80);
        let got = tok.encode_messages(&messages, &[n], true).unwrap();
        assert_eq!(got, want, "{name}: chat prompt ids");
    }
}

#[test]
fn a_folder_without_a_template_uses_the_built_in_one_with_the_same_ids() {
    let tmp = bare_folder();
    let tok = tokenizer(tmp.path());
    assert_eq!(
        tok.chat_template().unwrap().origin(),
        &TemplateOrigin::BuiltIn
    );
    let dir = fixture_dir("qwen3-vl-tiny");
    let (user_text, want) = reference_chat_prompt(&dir);
    let n = image0_tokens(&dir);
    let messages = [Message::user(vec![
        Part::Image,
        Part::Text(user_text.clone()),
    ])];
    assert_eq!(tok.encode_messages(&messages, &[n], true).unwrap(), want);
    assert_eq!(tok.encode_chat(&user_text, &[n]).unwrap(), want);
    // The MoE fixtures ship no template: the built-in one gives their reference ids too.
    for name in ["qwen3-vl-moe-tiny", "qwen3-vl-moe-tiny-released-layout"] {
        let dir = fixture_dir(name);
        let tok = tokenizer(&dir);
        assert_eq!(
            tok.chat_template().unwrap().origin(),
            &TemplateOrigin::BuiltIn
        );
        let (user_text, want) = reference_chat_prompt(&dir);
        assert_eq!(tok.encode_chat(&user_text, &[n]).unwrap(), want, "{name}");
    }
}

/// The expected text follows the released template by hand: the system message at index 0
/// goes in its own `<|im_start|>system` turn (no default system prompt is added), a user
/// turn writes its parts in order with an image as
/// `<|vision_start|><|image_pad|><|vision_end|>`, an assistant turn writes its text, each
/// turn ends `<|im_end|>\n`, and `add_generation_prompt` appends `<|im_start|>assistant\n`.
/// Jinja2 3.1.6 rendering the same template with transformers' settings (trim_blocks,
/// lstrip_blocks) gives the same string.
#[test]
fn a_multi_turn_conversation_renders_as_the_released_template_writes_it() {
    let messages = [
        Message::system("You are terse."),
        Message::user(vec![Part::Image, Part::Text("What is this?".into())]),
        Message::assistant("A cat."),
        Message::user(vec![Part::Text("And its colour?".into())]),
    ];
    let want = "<|im_start|>system\nYou are terse.<|im_end|>\n\
                <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n\
                <|im_start|>assistant\nA cat.<|im_end|>\n\
                <|im_start|>user\nAnd its colour?<|im_end|>\n\
                <|im_start|>assistant\n";
    let builtin = ChatTemplate::builtin();
    assert_eq!(builtin.render(&messages, true).unwrap(), want);
    // Without the generation prompt the conversation simply ends after the last turn.
    assert_eq!(
        builtin.render(&messages, false).unwrap(),
        want.strip_suffix("<|im_start|>assistant\n").unwrap()
    );
    // No system message: no system turn at all.
    assert_eq!(
        builtin.render(&messages[1..2], true).unwrap(),
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // The ids: the rendered text tokenized, the one image placeholder expanded.
    let tok = tokenizer(&fixture_dir("qwen3-vl-tiny"));
    let ids = tok.encode_messages(&messages, &[4], true).unwrap();
    let expanded = want.replace(IMAGE_PAD, &IMAGE_PAD.repeat(4));
    assert_eq!(ids, tok.encode(&expanded).unwrap());
}

#[test]
fn images_inside_a_turn_and_two_images_in_a_turn_expand_in_order() {
    let tok = tokenizer(&fixture_dir("qwen3-vl-tiny"));
    let pad = tok.token_id(IMAGE_PAD).unwrap();
    let messages = [Message::user(vec![
        Part::Text("Compare ".into()),
        Part::Image,
        Part::Text(" with ".into()),
        Part::Image,
        Part::Text(".".into()),
    ])];
    let ids = tok.encode_messages(&messages, &[3, 5], true).unwrap();
    let want_text = format!(
        "<|im_start|>user\nCompare <|vision_start|>{}<|vision_end|> with \
         <|vision_start|>{}<|vision_end|>.<|im_end|>\n<|im_start|>assistant\n",
        IMAGE_PAD.repeat(3),
        IMAGE_PAD.repeat(5)
    );
    assert_eq!(ids, tok.encode(&want_text).unwrap());
    // The runs of pads, in order: the first image's 3, then the second's 5.
    let mut runs = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        if id == pad {
            if i > 0 && ids[i - 1] == pad {
                *runs.last_mut().unwrap() += 1;
            } else {
                runs.push(1);
            }
        }
    }
    assert_eq!(runs, [3, 5]);
    // Images in different turns are numbered across the conversation.
    let messages = [
        Message::user(vec![Part::Image, Part::Text("a".into())]),
        Message::assistant("b"),
        Message::user(vec![Part::Text("c".into()), Part::Image]),
    ];
    let ids = tok.encode_messages(&messages, &[2, 6], true).unwrap();
    let first = ids.iter().position(|&i| i == pad).unwrap();
    assert_eq!(
        &ids[first..first + 3],
        [pad, pad, tok.token_id("<|vision_end|>").unwrap()]
    );
    assert_eq!(ids.iter().filter(|&&i| i == pad).count(), 8);
}

#[test]
fn the_single_turn_encoder_matches_the_hand_written_template() {
    let tok = tokenizer(&fixture_dir("qwen3-vl-tiny"));
    for (text, counts) in [
        ("Describe this image in one sentence.", vec![80]),
        ("", vec![1, 2]),
        ("no image at all", vec![]),
        ("  leading and trailing spaces  \n", vec![7]),
        ("{{ not a template }} {% neither %}", vec![]),
    ] {
        assert_eq!(
            tok.encode_chat(text, &counts).unwrap(),
            tok.encode(&chat_template(text, &counts)).unwrap(),
            "{text:?} {counts:?}"
        );
    }
}

#[test]
fn a_folder_template_is_what_the_single_turn_encoder_renders() {
    let tmp = bare_folder();
    fs::write(
        tmp.path().join("chat_template.jinja"),
        "{% for m in messages %}<|im_start|>{{ m.role }}\nSAYS {% for p in m.content %}\
         {% if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>\
         {% else %}{{ p.text }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}\
         {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let tok = tokenizer(tmp.path());
    assert_eq!(
        tok.chat_template().unwrap().origin(),
        &TemplateOrigin::File(tmp.path().join("chat_template.jinja"))
    );
    let want = format!(
        "<|im_start|>user\nSAYS <|vision_start|>{}<|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n",
        IMAGE_PAD.repeat(2)
    );
    assert_eq!(
        tok.encode_chat("hi", &[2]).unwrap(),
        tok.encode(&want).unwrap()
    );
    // And through a runner, as the command line uses it.
    let runner_dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "image0.png",
    ] {
        fs::copy(
            fixture_dir("qwen3-vl-tiny").join(f),
            runner_dir.path().join(f),
        )
        .unwrap();
    }
    fs::copy(
        tmp.path().join("chat_template.jinja"),
        runner_dir.path().join("chat_template.jinja"),
    )
    .unwrap();
    let runner = Runner::open(runner_dir.path()).unwrap();
    let images = runner
        .load_images(&[runner_dir.path().join("image0.png")])
        .unwrap();
    let ids = runner.chat_ids("hi", &images).unwrap();
    let tok = runner.tokenizer().unwrap();
    let want = format!(
        "<|im_start|>user\nSAYS <|vision_start|>{}<|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n",
        IMAGE_PAD.repeat(80)
    );
    assert_eq!(ids, tok.encode(&want).unwrap());
}

#[test]
fn templates_are_found_where_transformers_looks_in_its_order() {
    let tmp = bare_folder();
    let dir = tmp.path();
    let json_path = dir.join("chat_template.json");
    let jinja_path = dir.join("chat_template.jinja");
    let config_path = dir.join("tokenizer_config.json");
    let user = [Message::user(vec![Part::Text("x".into())])];

    // tokenizer_config.json's chat_template, with its special tokens as variables.
    fs::write(
        &config_path,
        r#"{"chat_template": "config {{ bos_token }}|{{ eos_token }} {{ messages[0].content }}",
            "bos_token": null, "eos_token": {"content": "<|im_end|>", "lstrip": false}}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_folder(dir).unwrap();
    assert_eq!(
        t.origin(),
        &TemplateOrigin::TokenizerConfig(config_path.clone())
    );
    assert_eq!(t.render(&user, true).unwrap(), "config |<|im_end|> x");

    // The list form: the template named "default".
    fs::write(
        &config_path,
        r#"{"chat_template": [{"name": "tool_use", "template": "tools"},
                               {"name": "default", "template": "default {{ messages|length }}"}]}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_folder(dir).unwrap();
    assert_eq!(t.render(&user, true).unwrap(), "default 1");

    // A tokenizer_config.json without a template leaves the built-in one.
    fs::write(&config_path, r#"{"eos_token": "<|im_end|>"}"#).unwrap();
    assert_eq!(
        ChatTemplate::from_folder(dir).unwrap().origin(),
        &TemplateOrigin::BuiltIn
    );

    // chat_template.jinja comes before tokenizer_config.json ...
    fs::write(&config_path, r#"{"chat_template": "config"}"#).unwrap();
    fs::write(&jinja_path, "jinja\n").unwrap();
    let t = ChatTemplate::from_folder(dir).unwrap();
    assert_eq!(t.origin(), &TemplateOrigin::File(jinja_path.clone()));
    // (a single trailing newline is dropped, as Jinja2 does by default)
    assert_eq!(t.render(&user, true).unwrap(), "jinja");

    // ... and chat_template.json before both.
    fs::write(&json_path, r#"{"chat_template": "json"}"#).unwrap();
    let t = ChatTemplate::from_folder(dir).unwrap();
    assert_eq!(t.origin(), &TemplateOrigin::File(json_path));
    assert_eq!(t.render(&user, true).unwrap(), "json");
}

#[test]
fn malformed_templates_and_files_are_bad_requests() {
    let user = [Message::user(vec![Part::Text("x".into())])];

    // A template that does not compile: the parser's message comes back.
    let msg = bad_request(ChatTemplate::from_source("{% if %}oops"));
    assert!(msg.contains("syntax error"), "{msg}");
    let msg = bad_request(ChatTemplate::from_source(
        "{% for m in messages %}never closed",
    ));
    assert!(msg.contains("syntax error"), "{msg}");

    // raise_exception: the template's own message.
    let t = ChatTemplate::from_source(
        "{% if messages[0].role != 'system' %}{{ raise_exception('System message first!') }}{% endif %}",
    )
    .unwrap();
    let msg = bad_request(t.render(&user, true));
    assert!(msg.contains("System message first!"), "{msg}");

    // Failures while rendering: an unknown filter, a method called wrongly, a division by 0.
    let t = ChatTemplate::from_source("{{ messages | no_such_filter }}").unwrap();
    let msg = bad_request(t.render(&user, true));
    assert!(msg.contains("unknown filter"), "{msg}");
    let t = ChatTemplate::from_source("{{ messages[0].content.startswith() }}").unwrap();
    bad_request(t.render(&user, true));
    let t = ChatTemplate::from_source("{{ 1 / 0 }}").unwrap();
    bad_request(t.render(&user, true));

    // Files: bad JSON, a missing key, a template of the wrong type, a broken list, bad Jinja.
    let tmp = bare_folder();
    let dir = tmp.path();
    for (file, text) in [
        ("chat_template.json", "{not json"),
        ("chat_template.json", r#"{"template": "x"}"#),
        ("chat_template.json", r#"{"chat_template": 7}"#),
        ("chat_template.json", r#"{"chat_template": "{% if %}"}"#),
        ("chat_template.jinja", "{{ unclosed"),
        ("tokenizer_config.json", "[1, 2"),
        (
            "tokenizer_config.json",
            r#"{"chat_template": [{"name": "tool_use", "template": "t"}]}"#,
        ),
        (
            "tokenizer_config.json",
            r#"{"chat_template": [{"oops": 1}]}"#,
        ),
        ("tokenizer_config.json", r#"{"chat_template": {"a": 1}}"#),
    ] {
        for f in [
            "chat_template.json",
            "chat_template.jinja",
            "tokenizer_config.json",
        ] {
            let _ = fs::remove_file(dir.join(f));
        }
        fs::write(dir.join(file), text).unwrap();
        let msg = bad_request(ChatTemplate::from_folder(dir));
        assert!(msg.contains(file), "{file} {text}: {msg}");
        // The tokenizer still opens and encodes plain text (a checkpoint still runs from
        // ids); encoding a conversation reports the template's error.
        let tok = tokenizer(dir);
        assert!(!tok.encode("hello").unwrap().is_empty());
        assert!(tok.chat_template().is_err());
        let msg = bad_request(tok.encode_chat("hello", &[]));
        assert!(msg.contains(file), "{file} {text}: {msg}");
    }
    // A chat_template.jinja that is not UTF-8 is an I/O error, not a panic.
    for f in [
        "chat_template.json",
        "chat_template.jinja",
        "tokenizer_config.json",
    ] {
        let _ = fs::remove_file(dir.join(f));
    }
    fs::write(dir.join("chat_template.jinja"), [0xff, 0xfe, 0x00]).unwrap();
    assert!(matches!(
        ChatTemplate::from_folder(dir),
        Err(RunnerError::Io { .. })
    ));
}

#[test]
fn images_that_do_not_match_the_placeholders_are_typed_errors() {
    let tok = tokenizer(&fixture_dir("qwen3-vl-tiny"));
    let one_image = [Message::user(vec![Part::Image, Part::Text("x".into())])];
    for counts in [&[][..], &[1, 1][..]] {
        assert!(matches!(
            tok.encode_messages(&one_image, counts, true),
            Err(RunnerError::ImagePadMismatch(_))
        ));
    }
    // The released template writes no image for an assistant turn: the image has no
    // placeholder to expand.
    let in_reply = [Message::new(Role::Assistant, vec![Part::Image])];
    assert!(matches!(
        tok.encode_messages(&in_reply, &[4], true),
        Err(RunnerError::ImagePadMismatch(_))
    ));
    // A placeholder count that differs from the images given.
    assert!(matches!(
        expand_image_pads(&[1, 9, 2, 9], 9, &[3]),
        Err(RunnerError::ImagePadMismatch(_))
    ));
    assert_eq!(
        expand_image_pads(&[1, 9, 2, 9], 9, &[3, 1]).unwrap(),
        [1, 9, 9, 9, 2, 9]
    );
}

/// `tojson` writes what transformers' filter (`json.dumps(x, ensure_ascii=False, ...)`)
/// writes, and templates can call Python's string methods.
#[test]
fn tojson_and_python_string_methods_behave_as_in_transformers() {
    let messages = [Message::user(vec![Part::Text("héllo \"q\"\n".into())])];
    let t = ChatTemplate::from_source("{{ messages[0] | tojson }}").unwrap();
    assert_eq!(
        t.render(&messages, false).unwrap(),
        r#"{"role": "user", "content": "héllo \"q\"\n"}"#
    );
    let t = ChatTemplate::from_source("{{ messages | tojson(indent=2) }}").unwrap();
    assert_eq!(
        t.render(&messages, false).unwrap(),
        "[\n  {\n    \"role\": \"user\",\n    \"content\": \"héllo \\\"q\\\"\\n\"\n  }\n]"
    );
    let mixed = [Message::user(vec![Part::Image, Part::Text("a".into())])];
    let t =
        ChatTemplate::from_source("{{ messages[0].content | tojson(sort_keys=true) }}").unwrap();
    assert_eq!(
        t.render(&mixed, false).unwrap(),
        r#"[{"type": "image"}, {"text": "a", "type": "text"}]"#
    );
    let t = ChatTemplate::from_source(
        "{% set c = messages[0].content %}{{ c.startswith('hé') }} {{ c.endswith('x') }} \
         {{ c.split('\"')[1] }} [{{ c.strip() }}] {{ c.lstrip('h') | length }}",
    )
    .unwrap();
    assert_eq!(
        t.render(&messages, false).unwrap(),
        "True False q [héllo \"q\"] 9"
    );
    // Loop controls, as transformers enables them.
    let t = ChatTemplate::from_source(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}",
    )
    .unwrap();
    let two = [Message::system("s"), Message::assistant("a")];
    assert_eq!(t.render(&two, false).unwrap(), "system");
}
