//! Compiles the CRI v1 protobufs in `proto/` into Rust (messages with prost, services with tonic).
//!
//! It also leaves two things in `OUT_DIR` for `tests/cri_roundtrip.rs`, which checks the
//! generated types against the proto itself: the file descriptor set protoc produced, and
//! tables naming every message and enum of the proto next to its generated Rust type. The
//! tables are generated from the descriptor rather than written by hand so that a type added
//! to the proto cannot be forgotten by the test.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use heck::{ToSnakeCase, ToUpperCamelCase};
use prost::Message as _;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

/// Names of the generated files in `OUT_DIR`; the test includes them by these names.
const DESCRIPTOR_SET: &str = "cri_descriptor_set.bin";
const MESSAGE_TABLE: &str = "cri_message_table.rs";
const ENUM_TABLE: &str = "cri_enum_table.rs";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let api = proto_root.join("runtime/v1/api.proto");
    println!("cargo:rerun-if-changed={}", api.display());

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join(DESCRIPTOR_SET);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Its Debug would print registry passwords and tokens into logs; cri.rs has a redacting one.
        .skip_debug(["runtime.v1.AuthConfig"])
        .file_descriptor_set_path(&descriptor_path)
        .compile_protos(&[api], &[proto_root])?;

    let descriptors = FileDescriptorSet::decode(std::fs::read(&descriptor_path)?.as_slice())?;
    let mut messages = Vec::new();
    let mut enums = Vec::new();
    for file in &descriptors.file {
        let scope = Scope {
            proto: file.package().to_owned(),
            rust: Vec::new(),
        };
        collect(
            &scope,
            &file.message_type,
            &file.enum_type,
            &mut messages,
            &mut enums,
        );
    }
    std::fs::write(out_dir.join(MESSAGE_TABLE), message_table(&messages)?)?;
    std::fs::write(out_dir.join(ENUM_TABLE), enum_table(&enums)?)?;
    Ok(())
}

/// Where a type is declared: its proto package/outer messages and the Rust modules prost
/// puts it in.
#[derive(Clone)]
struct Scope {
    proto: String,
    rust: Vec<String>,
}

/// A proto type with its full proto name and its Rust path relative to the package module.
struct Named {
    proto: String,
    rust: String,
}

impl Scope {
    fn name(&self, proto_name: &str) -> Named {
        // prost-build names types with heck's UpperCamelCase and nests the types declared
        // inside a message in a snake_case module named after that message.
        let mut rust = self.rust.join("::");
        if !rust.is_empty() {
            rust.push_str("::");
        }
        rust.push_str(&proto_name.to_upper_camel_case());
        Named {
            proto: format!("{}.{proto_name}", self.proto),
            rust,
        }
    }
}

fn collect(
    scope: &Scope,
    message_types: &[DescriptorProto],
    enum_types: &[EnumDescriptorProto],
    messages: &mut Vec<Named>,
    enums: &mut Vec<Named>,
) {
    for e in enum_types {
        enums.push(scope.name(e.name()));
    }
    for m in message_types {
        // Map entries are synthetic: prost turns them into HashMaps, not types.
        if m.options.as_ref().is_some_and(|o| o.map_entry()) {
            continue;
        }
        let named = scope.name(m.name());
        let mut inner = scope.clone();
        inner.proto = named.proto.clone();
        inner.rust.push(m.name().to_snake_case());
        messages.push(named);
        collect(&inner, &m.nested_type, &m.enum_type, messages, enums);
    }
}

/// An array expression of `(full proto name, fn(&[u8]) -> Result<Vec<u8>, DecodeError>)`;
/// the including scope provides `cri` (the generated module) and `roundtrip::<T>`.
fn message_table(messages: &[Named]) -> Result<String, std::fmt::Error> {
    let mut out = String::from("[\n");
    for m in messages {
        writeln!(
            out,
            "    ({:?}, roundtrip::<cri::{}> as RoundTrip),",
            m.proto, m.rust
        )?;
    }
    out.push_str("]\n");
    Ok(out)
}

/// An array expression of `(full proto name, fn(i32) -> Option<&'static str>)` giving the
/// generated enum's proto value name for a number; the including scope provides `cri`.
fn enum_table(enums: &[Named]) -> Result<String, std::fmt::Error> {
    let mut out = String::from("[\n");
    for e in enums {
        writeln!(
            out,
            "    ({:?}, (|n| cri::{}::try_from(n).ok().map(|v| v.as_str_name())) as EnumName),",
            e.proto, e.rust
        )?;
    }
    out.push_str("]\n");
    Ok(out)
}
