//! The azure_devops webhook parser, on a verified delivery, and trigger matching of what it yields.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_server::hooks::Source;

fuzz_target!(|data: &[u8]| outpost_fuzz::deliver(Source::AzureDevops, data));
