//! Compiles `proto/` with protox (pure Rust: no system `protoc`) and tonic-prost-build.
//!
//! Two passes, because `ChatMessage` is shared by every receiver of a message:
//! 1. everything in `chat.v1` but `ChatMessage`, which maps to the hand-written
//!    `confab::ChatMessage` (an `Arc` that encodes once; see `src/message.rs`);
//! 2. `message.proto` alone, giving the plain record that `confab::ChatMessage` wraps.
//!
//! The service and client use `crate::codec::ChatCodec` (prost with smaller buffers).
//! The full descriptor set is also written out for the reflection service.

use std::{env, fs, path::PathBuf};

use protox::prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(["chat/v1/chat.proto"])?
        .file_descriptor_set();
    fs::write(out.join("chat_v1_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .codec_path("crate::codec::ChatCodec")
        .extern_path(".chat.v1.ChatMessage", "crate::message::ChatMessage")
        .extern_path(".chat.v1.MessageKind", "crate::message::MessageKind")
        .compile_fds(fds.clone())?;

    let record_dir = out.join("record");
    fs::create_dir_all(&record_dir)?;
    let mut record = fds;
    record
        .file
        .retain(|file| file.name() != "chat/v1/chat.proto");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .out_dir(&record_dir)
        .compile_fds(record)?;

    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
