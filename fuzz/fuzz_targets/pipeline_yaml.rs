//! The pipeline YAML parser: any text either parses into a definition that survives a JSON round
//! trip (how it is stored) and orders its jobs, or is refused with a position.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_server::pipeline::{self, PipelineDef};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match pipeline::parse(text) {
        Ok(def) => {
            assert_eq!(def.topological_order().len(), def.jobs.len());
            let json = serde_json::to_string(&def).expect("a definition serialises");
            let back: PipelineDef = serde_json::from_str(&json).expect("and deserialises");
            assert_eq!(back, def, "the stored definition is the parsed one");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
