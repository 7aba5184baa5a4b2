//! `confab`: the Confab terminal client. Parses flags and runs one of its modes:
//! the full-screen chat (default), `--pipe` for scripts, or `demo`.

mod advice;
mod app;
mod command;
mod demo;
mod event;
mod input;
mod pipe;
mod scrollback;
mod terminal;
mod ui;

use std::{
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use confab::{Conversation, ConversationConfig, ConversationEvent};
use crossterm::event::EventStream;
use futures::StreamExt as _;
use tokio::sync::mpsc;

use crate::{
    app::{App, Effect},
    event::Event,
};

/// Terminal chat on a Confab server.
#[derive(Debug, Parser)]
#[command(name = "confab", version, about)]
struct Cli {
    /// The server, `host:port` or `http://host:port` (`https://` for TLS) [default:
    /// 127.0.0.1:50051; for `demo`, a server of its own]. Repeat it (or separate them with
    /// commas) for the nodes of a cluster: when one goes away, the client moves to the next
    /// and resumes every room from its last message.
    #[arg(long, env = "CONFAB_SERVER", value_delimiter = ',', global = true)]
    server: Vec<String>,
    /// The CA (PEM) that signed an `https://` server's certificate.
    #[arg(long, env = "CONFAB_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// Your nickname (default: $USER).
    #[arg(long, env = "CONFAB_NICK", global = true)]
    nick: Option<String>,
    /// A token from the server's identity provider, for servers started with --jwt-*
    /// (--nick must then be the token's user).
    #[arg(
        long,
        env = "CONFAB_TOKEN",
        hide_env_values = true,
        global = true,
        requires = "nick"
    )]
    token: Option<String>,
    /// A room to join; repeat for more.
    #[arg(
        long = "room",
        env = "CONFAB_ROOMS",
        value_delimiter = ',',
        default_value = "lobby",
        global = true
    )]
    rooms: Vec<String>,
    /// Lines of each room kept in memory; scrolling further back reads the server's history.
    #[arg(long, env = "CONFAB_SCROLLBACK", default_value_t = scrollback::SCROLLBACK, value_parser = clap::value_parser!(usize), global = true)]
    scrollback: usize,
    /// Pipe mode: each stdin line is a message; every event is a JSON line on stdout.
    #[arg(long)]
    pipe: bool,
    /// With --pipe: keep running after stdin ends.
    #[arg(long, requires = "pipe")]
    follow: bool,
    /// With --pipe (without --follow): give up, exiting non-zero, after this long unable
    /// to connect.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, requires = "pipe")]
    connect_timeout: Duration,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Chat with simulated users in a lively room (with a server of its own unless
    /// --server is given).
    Demo {
        /// How many simulated users.
        #[arg(long, default_value_t = 4)]
        users: usize,
    },
}

/// Where the client looks for a server unless told.
const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_server = cli.server.is_empty() && cli.mode.is_none();
    match start(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("confab: {error}");
            if default_server && error.to_string().contains("connection refused") {
                eprintln!("{}", advice::NO_SERVER);
            }
            ExitCode::FAILURE
        }
    }
}

async fn start(cli: Cli) -> anyhow::Result<()> {
    let nick = cli
        .nick
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "guest".into());
    let mut config = ConversationConfig {
        servers: if cli.server.is_empty() {
            vec![DEFAULT_SERVER.into()]
        } else {
            cli.server.clone()
        },
        nickname: nick.clone(),
        rooms: cli.rooms.clone(),
        backoff: Default::default(),
        identity_token: cli.token.clone(),
        tls: match &cli.tls_ca {
            Some(path) => Some(confab::Tls {
                ca_pem: Some(
                    std::fs::read(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                ),
                identity: None,
            }),
            None => None,
        },
    };
    if let Some(Mode::Demo { users }) = cli.mode {
        let _server = if cli.server.is_empty() {
            let (url, stop) = demo::embedded_server().await?;
            config.servers = vec![url];
            Some(stop)
        } else {
            None
        };
        let room = cli.rooms.first().cloned().unwrap_or_else(|| "lobby".into());
        demo::start_users(&config.servers, &room, users);
        return chat(config, false, cli.scrollback).await;
    }
    if cli.pipe {
        let room = cli
            .rooms
            .first()
            .cloned()
            .context("--pipe needs a --room")?;
        return pipe::run(config, &room, cli.follow, cli.connect_timeout).await;
    }
    chat(config, cli.server.is_empty(), cli.scrollback).await
}

/// The full-screen client; `default_server`: no server was named, so a refused connection
/// comes with advice on starting one.
async fn chat(
    config: ConversationConfig,
    default_server: bool,
    scrollback: usize,
) -> anyhow::Result<()> {
    let (conversation, net) = Conversation::start(config.clone());
    let mut terminal = terminal::init().context("cannot take over the terminal")?;
    let size = terminal
        .size()
        .map(|s| (s.width, s.height))
        .unwrap_or((80, 24));
    let mut app = App::new(&config.nickname, &config.rooms, SystemTime::now(), size);
    app.offset = *chrono::Local::now().offset();
    app.advise_on_refusal = default_server;
    // Too few lines to page through is no scrollback at all.
    app.scrollback = scrollback.max(100);
    let result = run(&mut terminal, &mut app, conversation, net).await;
    terminal::restore();
    result
}

/// The UI loop: wait for the terminal, the network or the clock; update; redraw once per
/// batch. It never waits on the network: effects go to a task of their own.
async fn run(
    terminal: &mut ratatui::DefaultTerminal,
    app: &mut App,
    conversation: Conversation,
    mut net: mpsc::Receiver<ConversationEvent>,
) -> anyhow::Result<()> {
    let (effects, pending) = mpsc::unbounded_channel();
    tokio::spawn(perform(conversation, pending));
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        terminal.draw(|frame| {
            frame.render_widget(&*app, frame.area());
            frame.set_cursor_position(ui::cursor(app, frame.area()));
        })?;
        let event = tokio::select! {
            key = keys.next() => match key {
                Some(Ok(event)) => match Event::from_terminal(event) {
                    Some(event) => event,
                    None => continue,
                },
                // The terminal is gone: nothing left to chat in.
                Some(Err(_)) | None => return Ok(()),
            },
            event = net.recv() => match event {
                Some(event) => Event::Net(event),
                None => return Ok(()),
            },
            _ = tick.tick() => Event::Tick(SystemTime::now()),
        };
        for effect in app.update(event) {
            let _ = effects.send(effect);
        }
        // Take whatever else the network has ready before drawing again, so a flood is
        // drawn once per batch, not once per message.
        for _ in 0..512 {
            let Ok(event) = net.try_recv() else { break };
            for effect in app.update(Event::Net(event)) {
                let _ = effects.send(effect);
            }
        }
        if app.quit {
            return Ok(());
        }
    }
}

/// Carries the UI's effects to the connection, in order.
async fn perform(conversation: Conversation, mut effects: mpsc::UnboundedReceiver<Effect>) {
    while let Some(effect) = effects.recv().await {
        let done = match effect {
            Effect::Say { room, text } => conversation.say(&room, &text).await.map(drop),
            Effect::Act { room, text } => conversation
                .send(&room, &text, confab::pb::MessageKind::Action)
                .await
                .map(drop),
            Effect::Join(room) => conversation.join(&room).await,
            Effect::Leave(room) => conversation.leave(&room).await,
            Effect::Typing { room, typing } => conversation.typing(&room, typing).await,
            Effect::SetTopic { room, topic } => conversation.set_topic(&room, &topic).await,
            Effect::ListRooms => conversation.list_rooms().await,
            Effect::Ping(micros) => conversation.ping(micros).await,
            Effect::Invite { room, user } => conversation.invite(&room, &user).await,
            Effect::Kick { room, user, reason } => conversation.kick(&room, &user, &reason).await,
            Effect::Ban { room, user, reason } => conversation.ban(&room, &user, &reason).await,
            Effect::Nick(nickname) => conversation.set_nickname(&nickname).await,
            Effect::History {
                room,
                direction,
                seq,
                limit,
            } => conversation.history(&room, direction, seq, limit).await,
        };
        if done.is_err() {
            return;
        }
    }
}
