//! The slash commands: what a line typed into the input means.

/// Every command, for `/help` and Tab completion.
pub const COMMANDS: &[(&str, &str)] = &[
    (
        "/join",
        "/join ROOM — enter a room (created if new) and switch to it",
    ),
    (
        "/leave",
        "/leave [ROOM] — leave the current (or named) room",
    ),
    ("/me", "/me TEXT — an action: * you TEXT"),
    ("/topic", "/topic TEXT — (owner) set the room's topic"),
    ("/who", "/who — who is in this room"),
    (
        "/invite",
        "/invite NICK — (owner) let NICK into this private room, or lift their ban",
    ),
    (
        "/kick",
        "/kick NICK [REASON] — (owner) put NICK out of this room",
    ),
    (
        "/ban",
        "/ban NICK [REASON] — (owner) put NICK out of this room for good",
    ),
    ("/rooms", "/rooms — list the server's rooms"),
    (
        "/nick",
        "/nick NAME — chat under another nickname (reconnects as NAME)",
    ),
    ("/help", "/help — this list"),
    ("/quit", "/quit — leave Confab"),
];

/// What a line of input asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A plain message to the current room.
    Say(String),
    /// `/me TEXT`.
    Me(String),
    /// `/join ROOM`.
    Join(String),
    /// `/leave [ROOM]`.
    Leave(Option<String>),
    /// `/topic TEXT`.
    Topic(String),
    /// `/who`.
    Who,
    /// `/invite NICK`.
    Invite(String),
    /// `/kick NICK [REASON]`.
    Kick(String, String),
    /// `/ban NICK [REASON]`.
    Ban(String, String),
    /// `/rooms`.
    Rooms,
    /// `/nick NAME`.
    Nick(String),
    /// `/help`.
    Help,
    /// `/quit`.
    Quit,
}

/// Why a line is not a command, as a hint to show under the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint(pub String);

/// Parses a line. Lines not starting with `/` are messages; `//text` sends `/text`.
pub fn parse(line: &str) -> Result<Option<Command>, Hint> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    if let Some(escaped) = line.strip_prefix("//") {
        return Ok(Some(Command::Say(format!("/{escaped}"))));
    }
    let Some(rest) = trimmed.strip_prefix('/') else {
        return Ok(Some(Command::Say(line.to_owned())));
    };
    let (name, args) = match rest.split_once(char::is_whitespace) {
        Some((name, args)) => (name, args.trim()),
        None => (rest, ""),
    };
    let usage = |name: &str| {
        let text = COMMANDS
            .iter()
            .find(|(n, _)| n.trim_start_matches('/') == name)
            .map_or("", |(_, help)| help);
        Hint(format!("usage: {text}"))
    };
    let command = match name.to_ascii_lowercase().as_str() {
        "me" if args.is_empty() => return Err(usage("me")),
        "me" => Command::Me(args.to_owned()),
        "join" | "j" => match args.split_whitespace().collect::<Vec<_>>().as_slice() {
            [room] => Command::Join(room.trim_start_matches('#').to_owned()),
            _ => return Err(usage("join")),
        },
        "leave" | "part" => match args.split_whitespace().collect::<Vec<_>>().as_slice() {
            [] => Command::Leave(None),
            [room] => Command::Leave(Some(room.trim_start_matches('#').to_owned())),
            _ => return Err(usage("leave")),
        },
        "topic" => Command::Topic(args.to_owned()),
        "who" | "names" => Command::Who,
        "invite" => match args.split_whitespace().collect::<Vec<_>>().as_slice() {
            [nick] => Command::Invite((*nick).to_owned()),
            _ => return Err(usage("invite")),
        },
        "kick" | "ban" => {
            let Some(nick) = args.split_whitespace().next() else {
                return Err(usage(name));
            };
            let reason = args[nick.len()..].trim().to_owned();
            if name.eq_ignore_ascii_case("kick") {
                Command::Kick(nick.to_owned(), reason)
            } else {
                Command::Ban(nick.to_owned(), reason)
            }
        }
        "rooms" | "list" => Command::Rooms,
        "nick" => match args.split_whitespace().collect::<Vec<_>>().as_slice() {
            [nick] => Command::Nick((*nick).to_owned()),
            _ => return Err(usage("nick")),
        },
        "help" | "?" => Command::Help,
        "quit" | "exit" | "q" => Command::Quit,
        other => {
            return Err(Hint(format!(
                "unknown command /{other}; /help lists them (start a message with // to send a leading /)"
            )));
        }
    };
    Ok(Some(command))
}

/// Commands starting with `prefix` (which starts with `/`), for Tab completion.
pub fn complete(prefix: &str) -> Vec<&'static str> {
    COMMANDS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| name.starts_with(prefix))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_are_messages() {
        assert_eq!(
            parse("hello there"),
            Ok(Some(Command::Say("hello there".into())))
        );
        assert_eq!(parse("  "), Ok(None));
        assert_eq!(parse("//shrug"), Ok(Some(Command::Say("/shrug".into()))));
    }

    #[test]
    fn commands_parse_with_their_arguments() {
        assert_eq!(parse("/me waves"), Ok(Some(Command::Me("waves".into()))));
        assert_eq!(parse("/join rust"), Ok(Some(Command::Join("rust".into()))));
        assert_eq!(parse("/join #rust"), Ok(Some(Command::Join("rust".into()))));
        assert_eq!(parse("/leave"), Ok(Some(Command::Leave(None))));
        assert_eq!(
            parse("/leave rust"),
            Ok(Some(Command::Leave(Some("rust".into()))))
        );
        assert_eq!(
            parse("/topic all things Rust"),
            Ok(Some(Command::Topic("all things Rust".into())))
        );
        assert_eq!(parse("/topic"), Ok(Some(Command::Topic(String::new()))));
        assert_eq!(parse("/WHO"), Ok(Some(Command::Who)));
        assert_eq!(
            parse("/invite bob"),
            Ok(Some(Command::Invite("bob".into())))
        );
        assert_eq!(
            parse("/kick bob  spamming links"),
            Ok(Some(Command::Kick("bob".into(), "spamming links".into())))
        );
        assert_eq!(
            parse("/ban bob"),
            Ok(Some(Command::Ban("bob".into(), String::new())))
        );
        assert_eq!(parse("/rooms"), Ok(Some(Command::Rooms)));
        assert_eq!(parse("/help"), Ok(Some(Command::Help)));
        assert_eq!(parse("/quit"), Ok(Some(Command::Quit)));
    }

    #[test]
    fn bad_arguments_and_unknown_commands_get_hints() {
        assert!(parse("/join").unwrap_err().0.contains("usage: /join ROOM"));
        assert!(parse("/join a b").unwrap_err().0.contains("usage: /join"));
        assert!(parse("/me").unwrap_err().0.contains("usage: /me"));
        assert!(parse("/kick").unwrap_err().0.contains("usage: /kick NICK"));
        assert!(
            parse("/invite a b")
                .unwrap_err()
                .0
                .contains("usage: /invite")
        );
        assert!(
            parse("/frobnicate")
                .unwrap_err()
                .0
                .contains("unknown command /frobnicate")
        );
    }

    #[test]
    fn completion_offers_matching_commands() {
        assert_eq!(complete("/j"), ["/join"]);
        assert_eq!(complete("/q"), ["/quit"]);
        assert_eq!(complete("/x"), Vec::<&str>::new());
        assert_eq!(complete("/").len(), COMMANDS.len());
    }
}
