//! The contract documents a limit for every string and list a caller sends.

use std::collections::{BTreeSet, HashMap};

use prost::Message;
use prost_types::{
    DescriptorProto, FileDescriptorSet,
    field_descriptor_proto::{Label, Type},
};

/// Words that say what bounds a field: a size, or a rule that implies one.
const BOUNDED: &[&str] = &["at most", "uuid", "the rules of", "output only", "limits"];

#[test]
fn every_string_and_list_of_every_request_documents_its_limit() {
    let set = FileDescriptorSet::decode(users_service::pb::FILE_DESCRIPTOR_SET).unwrap();
    let mut messages: HashMap<String, (&DescriptorProto, Vec<i32>, usize)> = HashMap::new();
    let mut comments: HashMap<(usize, Vec<i32>), String> = HashMap::new();
    for (file_index, file) in set.file.iter().enumerate() {
        for (i, message) in file.message_type.iter().enumerate() {
            messages.insert(
                format!(".{}.{}", file.package(), message.name()),
                (message, vec![4, i as i32], file_index),
            );
        }
        for location in file.source_code_info.iter().flat_map(|info| &info.location) {
            // One line, one case: a limit may be written across a line break.
            let text = location
                .leading_comments()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .to_lowercase();
            comments.insert((file_index, location.path.clone()), text);
        }
    }
    let requests: Vec<String> = set
        .file
        .iter()
        .filter(|file| file.package() == "users.v1")
        .flat_map(|file| &file.service)
        .flat_map(|service| &service.method)
        .map(|method| method.input_type().to_owned())
        .collect();
    assert!(requests.len() >= 12, "{requests:?}");

    let mut seen = BTreeSet::new();
    let mut queue = requests;
    let mut undocumented = Vec::new();
    while let Some(name) = queue.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let Some((message, path, file)) = messages.get(&name) else {
            continue;
        };
        let message_comment = comments
            .get(&(*file, path.clone()))
            .cloned()
            .unwrap_or_default();
        for (i, field) in message.field.iter().enumerate() {
            let mut field_path = path.clone();
            field_path.extend([2, i as i32]);
            let comment = comments
                .get(&(*file, field_path))
                .cloned()
                .unwrap_or_default();
            let is_text = matches!(field.r#type(), Type::String | Type::Bytes);
            let is_list = field.label() == Label::Repeated;
            let is_json = field.type_name() == ".google.protobuf.Struct";
            if field.r#type() == Type::Message && field.type_name().starts_with(".users.v1.") {
                queue.push(field.type_name().to_owned());
            }
            if !(is_text || is_list || is_json) {
                continue;
            }
            let documented = BOUNDED
                .iter()
                .any(|word| comment.contains(word) || message_comment.contains(word));
            if !documented {
                undocumented.push(format!("{name}.{}: {comment:?}", field.name()));
            }
        }
    }
    assert!(
        undocumented.is_empty(),
        "fields without a documented limit:\n{}",
        undocumented.join("\n")
    );
}
