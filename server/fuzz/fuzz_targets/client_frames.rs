//! Every frame a client can send, decoded from arbitrary bytes and checked the way the
//! server checks it: decoding either fails cleanly or yields a request whose validation
//! either refuses it, naming a field, or accepts values that hold to the protocol's rules.
//! Nothing may panic, and nothing accepted may break a rule.

#![no_main]

use confab::pb;
use confab_server::{pagination, validate};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

/// The server's default text limit.
const MAX_TEXT_BYTES: usize = 4096;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = pb::ChatRequest::decode(data)
        && let Some(command) = &frame.command
    {
        match validate::command(command, MAX_TEXT_BYTES) {
            Ok(()) => accepted(command),
            Err(violation) => assert!(!violation.field.is_empty()),
        }
    }
    if let Ok(request) = pb::PublishRequest::decode(data)
        && let Some(message) = request.message
        && let Ok(message) = validate::outgoing(message, MAX_TEXT_BYTES)
    {
        room(&message.room);
        assert!(message.text.len() <= MAX_TEXT_BYTES);
    }
    if let Ok(request) = pb::LoginRequest::decode(data)
        && validate::nickname("nickname", &request.nickname).is_ok()
    {
        nick(&request.nickname);
    }
    if let Ok(request) = pb::CreateRoomRequest::decode(data)
        && validate::room_name("room", &request.room).is_ok()
    {
        room(&request.room);
        let _ = validate::topic("topic", &request.topic);
    }
    if let Ok(request) = pb::GetHistoryRequest::decode(data) {
        let _ = pagination::page_size(request.page_size);
        if let Ok(Some(position)) =
            pagination::decode(&request.page_token, "history", &request.room)
        {
            // A token decodes only to what `encode` put in it for this room.
            assert_eq!(
                pagination::encode("history", &request.room, &position),
                request.page_token
            );
        }
    }
    if let Ok(request) = pb::SubscribeRequest::decode(data) {
        for position in &request.rooms {
            let _ = validate::room_name("rooms.room", &position.room);
        }
    }
});

/// What an accepted command may contain.
fn accepted(command: &pb::chat_request::Command) {
    use pb::chat_request::Command;
    match command {
        Command::Join(join) => room(&join.room),
        Command::Leave(leave) => room(&leave.room),
        Command::Send(message) => {
            room(&message.room);
            assert!(message.text.len() <= MAX_TEXT_BYTES);
            assert!(!message.client_msg_id.is_empty());
            // The session takes an accepted send as checked (`Outgoing::checked`): it must
            // pass the full message check too, kind included.
            assert!(validate::outgoing(message.clone(), MAX_TEXT_BYTES).is_ok());
        }
        Command::Typing(typing) => room(&typing.room),
        Command::SetTopic(set) => {
            room(&set.room);
            assert!(!set.topic.contains('\n'));
        }
        Command::Invite(invite) => {
            room(&invite.room);
            nick(&invite.user);
        }
        Command::Kick(pb::Kick { room: r, user, .. })
        | Command::Ban(pb::Ban { room: r, user, .. }) => {
            room(r);
            nick(user);
        }
        Command::Rename(rename) => nick(&rename.nickname),
        Command::Ping(_) => {}
    }
}

fn room(name: &str) {
    assert!((1..=64).contains(&name.len()), "{name:?}");
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'),
        "{name:?}"
    );
}

/// An accepted nickname: its enforced form keeps Confab's rules on top of PRECIS, and
/// enforcing it again changes nothing.
fn nick(accepted: &str) {
    let name = &confab_server::nickname::enforce(accepted).expect("an accepted nickname");
    let chars = name.chars().count();
    assert!((1..=32).contains(&chars) && !name.contains(' '), "{name:?}");
    assert!(name.chars().next().is_some_and(char::is_alphanumeric), "{name:?}");
    assert_eq!(
        confab_server::nickname::enforce(name).as_deref(),
        Ok(name.as_str()),
        "enforcement is stable"
    );
}
