//! The gateway's OpenAI request parsing and translation: any body either becomes a request
//! that passes the protocol's own validation, or a clear error; never a panic.
#![no_main]

use cocoon_client::openai::{ChatRequest, CompletionRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(chat) = serde_json::from_slice::<ChatRequest>(data)
        && let Ok(request) = chat.into_generate()
    {
        request.validate().expect("a translated request is valid");
    }
    if let Ok(completion) = serde_json::from_slice::<CompletionRequest>(data)
        && let Ok(request) = completion.into_generate()
    {
        request.validate().expect("a translated request is valid");
    }
});
