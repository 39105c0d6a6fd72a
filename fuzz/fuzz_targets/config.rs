//! Any text as a config file: validation never panics (nor overflows its stack on deep
//! nesting), and a refusal always names at least one problem.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Relative paths in the config resolve under a folder that does not exist, so a fuzzed
    // path reads nothing of this machine's.
    let base = Path::new("/nonexistent/portcullis-fuzz");
    if let Err(e) = Config::from_yaml(text, base, Path::new("fuzz.yaml")) {
        let problems = e.problems();
        assert!(!problems.is_empty(), "refused without a reason");
        assert!(problems.iter().all(|p| !p.is_empty()));
    }
});
