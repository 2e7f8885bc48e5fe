//! libFuzzer over `cocoon_fuzzing::frames`: the property is documented there, and the test
//! suite replays this target's seeds through the same function.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cocoon_fuzzing::frames(data));
