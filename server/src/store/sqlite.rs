//! [`SqliteStore`]: the default engine, one SQLite file under the data dir.
//!
//! **One writer, group commit.** Every write (room, message, retention) queues for the
//! one write connection ([`Writer`]). One leader at a time takes what has queued, applies
//! it in one transaction, commits, and then calls each write's [`Committed`] callback in
//! order. At light load a message's caller leads and commits it with no hand-off; under
//! load the writer thread leads and groups grow by themselves: while one commits, the
//! next gathers. One commit serves many messages, which is what lets a single SQLite file
//! take well over 100,000 messages a second.
//!
//! **Durability.** WAL mode with `synchronous = NORMAL`: a committed transaction is in
//! the WAL before the callback runs, so it survives a crash of the server process
//! (`kill -9`). Power loss may take the last commits; that is SQLite's documented trade.
//! Checkpoints run on a thread of their own ([`Checkpointer`]), not inside a commit
//! (unless the WAL reaches its bound).
//!
//! **Fail-stop.** If a commit fails (disk full, I/O error), that group and every later
//! write fail too. Going on would leave holes in a room's seqs.
//!
//! **Readers** use their own connections from a pool of at most [`MAX_READERS`]; in WAL
//! mode they see the last committed state and never wait for the writer. A read finding
//! every connection busy waits for one, so a burst of readers cannot open connections
//! (and file descriptors) without bound.
//!
//! **One server per data dir.** The store holds an exclusive lock on `LOCK` in the data
//! dir; a second server on the same dir is refused at start.
//!
//! **No file locks per transaction.** On Unix every connection opens through SQLite's
//! `unix-excl` VFS ([`connect`]): the first lock this process takes on the database is an
//! exclusive one, held until the last connection closes, and the WAL's index lives in
//! this process's memory instead of a `-shm` file. The connections of this process still
//! coordinate through SQLite's in-process lock table, as they always did. What goes is
//! the `fcntl` calls around every transaction: six per commit at light load, as many as
//! the commit's writes to the WAL. Other processes, which the `LOCK` already kept out of
//! a running server's data dir, find the database locked.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use confab::{ChatMessage, ChatMessageRecord};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};

use super::{
    Access, Committed, Lead, Retention, RoomRecord, SentKey, Store, StoreError,
    checkpoint::{self, Checkpointer},
    from_micros, to_micros,
    writer::Writer,
};

/// The database file in the data dir.
pub const DATABASE_FILE: &str = "confab.sqlite3";

/// The schema, one step per version. `PRAGMA user_version` records how many have been
/// applied; new steps are appended, never edited.
const MIGRATIONS: &[&str] = &[
    // 1: rooms and their logs. `head_seq` is the last seq ever assigned, kept apart from
    // the messages so that numbering survives retention removing all of them. (Since
    // round two it is kept lazily: see `HEAD_SEQ`.)
    "CREATE TABLE rooms (
         name          TEXT PRIMARY KEY,
         topic         TEXT NOT NULL,
         created_at_us INTEGER NOT NULL,
         created_by    TEXT NOT NULL,
         head_seq      INTEGER NOT NULL DEFAULT 0
     ) STRICT;
     CREATE TABLE messages (
         room          TEXT NOT NULL,
         seq           INTEGER NOT NULL,
         sender        TEXT NOT NULL,
         text          TEXT NOT NULL,
         kind          INTEGER NOT NULL,
         client_msg_id TEXT NOT NULL,
         sent_at_us    INTEGER NOT NULL,
         PRIMARY KEY (room, seq)
     ) STRICT, WITHOUT ROWID;
     -- Idempotency keys: a retry is found by who sent what id, where, and when. Covering
     -- (the key carries seq), so SQLite prefers it to scanning the room by primary key.
     CREATE INDEX messages_by_client_msg_id
         ON messages (room, sender, client_msg_id, sent_at_us);",
    // 2: private rooms, and who is invited to or banned from a room (lower-cased nicknames).
    "ALTER TABLE rooms ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE room_access (
         room   TEXT NOT NULL,
         user   TEXT NOT NULL,
         access TEXT NOT NULL CHECK (access IN ('invited', 'banned')),
         PRIMARY KEY (room, user)
     ) STRICT, WITHOUT ROWID;",
    // 3: each room's epoch (its seqs count within it), random; rooms made before get one.
    "ALTER TABLE rooms ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
     UPDATE rooms SET epoch = lower(hex(randomblob(8)));",
];

pub(super) enum Write {
    Room(RoomRecord, Committed),
    Message(ChatMessage, Committed),
    Topic(String, String, Committed),
    Access(String, String, Option<Access>, Committed),
    Retention(Retention, Committed),
    /// Flush and stop: the writer acknowledges and exits.
    Close(Committed),
}

impl Write {
    /// The text a message carries (0 for any other write).
    pub(super) fn text_bytes(&self) -> usize {
        match self {
            Write::Message(message, _) => message.text.len(),
            _ => 0,
        }
    }

    pub(super) fn done(self, result: Result<(), StoreError>) {
        match self {
            Write::Room(_, done)
            | Write::Message(_, done)
            | Write::Topic(_, _, done)
            | Write::Access(_, _, _, done)
            | Write::Retention(_, done)
            | Write::Close(done) => done(result),
        }
    }
}

/// The SQLite engine.
pub struct SqliteStore {
    /// The database file.
    path: PathBuf,
    /// The write connection, its queue and its thread.
    writer: Writer,
    /// The read connections.
    readers: Readers,
    /// The exclusive lock on the data dir, held until the store is closed: not until the
    /// last handle to it is dropped, which a task that is still ending may hold after the
    /// server has stopped, so that a server started again in the same process would find
    /// the dir in use.
    lock: Mutex<Option<File>>,
    /// How many background checkpoints have run.
    #[cfg_attr(not(test), expect(dead_code, reason = "the tests wait on it"))]
    checkpoints: Arc<checkpoint::Done>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `data_dir`, migrating its schema.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::io(format!("cannot create data dir {}", data_dir.display()), e)
        })?;
        let lock = File::create(data_dir.join("LOCK"))
            .map_err(|e| StoreError::io("cannot create the lock file", e))?;
        lock.try_lock()
            .map_err(|_| StoreError::InUse(data_dir.to_owned()))?;
        let path = data_dir.join(DATABASE_FILE);
        let mut connection = connect(&path, OpenFlags::default())?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        migrate(&mut connection)?;
        let checkpointer =
            Checkpointer::attach(connect(&path, OpenFlags::default())?, &mut connection)?;
        let checkpoints = checkpointer.done();

        let writer = Writer::start(connection, checkpointer)?;
        Ok(Self {
            path,
            writer,
            readers: Readers::default(),
            lock: Mutex::new(Some(lock)),
            checkpoints,
        })
    }

    /// Runs `read` on a pooled read connection.
    fn read<T>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let connection = match self.readers.take() {
            Some(connection) => connection,
            None => match open_reader(&self.path) {
                Ok(connection) => connection,
                Err(error) => {
                    self.readers.give_back(None);
                    return Err(error.into());
                }
            },
        };
        let result = read(&connection);
        self.readers.give_back(Some(connection));
        Ok(result?)
    }
}

/// Most read connections open at once.
pub const MAX_READERS: usize = 8;

/// The pool of read connections: idle ones, and how many exist.
#[derive(Default)]
struct Readers {
    /// A std `Mutex` and `Condvar`: reads are synchronous, and held for a pop or a push.
    pool: Mutex<ReaderPool>,
    /// Signalled when a connection is given back (or a slot freed).
    returned: std::sync::Condvar,
}

#[derive(Default)]
struct ReaderPool {
    idle: Vec<Connection>,
    /// Connections open, idle or in use (or being opened).
    open: usize,
}

impl Readers {
    /// An idle connection, or `None` when the caller should open one (a slot is reserved
    /// for it); waits while [`MAX_READERS`] are in use.
    fn take(&self) -> Option<Connection> {
        // A poisoned lock still guards a consistent pool: each update is one push, pop
        // or count.
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(connection) = pool.idle.pop() {
                return Some(connection);
            }
            if pool.open < MAX_READERS {
                pool.open += 1;
                return None;
            }
            pool = self.returned.wait(pool).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Returns a connection to the pool, or (`None`) frees the slot of one that could not
    /// be opened.
    fn give_back(&self, connection: Option<Connection>) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        match connection {
            Some(connection) => pool.idle.push(connection),
            None => pool.open -= 1,
        }
        drop(pool);
        self.returned.notify_one();
    }

    /// How many connections are open (for tests).
    #[cfg(test)]
    fn open(&self) -> usize {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).open
    }
}

/// A connection to the database at `path`, through SQLite's `unix-excl` VFS (the
/// module's "No file locks per transaction").
#[cfg(unix)]
fn connect(path: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    Connection::open_with_flags_and_vfs(path, flags, c"unix-excl")
}

/// A connection to the database at `path`, through SQLite's default VFS (`unix-excl` is
/// a VFS of SQLite's Unix build), which locks the file around every transaction.
#[cfg(not(unix))]
fn connect(path: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(path, flags)
}

/// A read-only connection to the database at `path`.
///
/// A read-only connection is the one kind `unix-excl` lets take POSIX locks of its own,
/// but only when no other connection of this process holds one: in WAL mode every
/// connection keeps its shared lock for as long as it is open (`pager_unlock` ends only
/// the WAL read), so with the writer open a reader never does (a test pins that the
/// process's one lock stays exclusive).
fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let connection = connect(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(connection)
}

/// Applies the migrations the database has not seen yet.
fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(StoreError::NewerSchema {
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = connection.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(step + 1).unwrap_or(i64::MAX),
        )?;
        tx.commit()?;
        tracing::info!(version = step + 1, "store schema migrated");
    }
    Ok(())
}

/// Applies one group of writes in one transaction.
pub(super) fn commit(connection: &mut Connection, group: &[Write]) -> Result<(), StoreError> {
    let tx = connection.transaction()?;
    {
        let mut insert_room = tx.prepare_cached(
            "INSERT INTO rooms (name, topic, created_at_us, created_by, head_seq, private, epoch)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut insert_message = tx.prepare_cached(
            "INSERT INTO messages (room, seq, sender, text, kind, client_msg_id, sent_at_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for write in group {
            match write {
                Write::Room(room, _) => {
                    insert_room.execute(params![
                        room.name,
                        room.topic,
                        to_micros(room.created_at),
                        room.created_by,
                        seq_to_sql(room.head_seq),
                        room.private,
                        room.epoch,
                    ])?;
                }
                Write::Message(message, _) => {
                    insert_message.execute(params![
                        message.room,
                        seq_to_sql(message.seq),
                        message.sender,
                        message.text,
                        message.kind,
                        message.client_msg_id,
                        to_micros(super::sent_at(message)),
                    ])?;
                }
                Write::Topic(room, topic, _) => {
                    tx.prepare_cached("UPDATE rooms SET topic = ?2 WHERE name = ?1")?
                        .execute(params![room, topic])?;
                }
                Write::Access(room, user, Some(access), _) => {
                    tx.prepare_cached(
                        "INSERT INTO room_access (room, user, access) VALUES (?1, ?2, ?3)
                         ON CONFLICT (room, user) DO UPDATE SET access = excluded.access",
                    )?
                    .execute(params![room, user, access.as_str()])?;
                }
                Write::Access(room, user, None, _) => {
                    tx.prepare_cached("DELETE FROM room_access WHERE room = ?1 AND user = ?2")?
                        .execute(params![room, user])?;
                }
                Write::Retention(retention, _) => apply_retention(&tx, *retention)?,
                Write::Close(_) => {}
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// Removes, per room, the oldest messages beyond the count limit and those older than
/// the age limit. Only a prefix of each log is ever removed, so what remains is contiguous.
fn apply_retention(tx: &Transaction<'_>, retention: Retention) -> rusqlite::Result<()> {
    // The heads are brought up to date before any message goes: after this, a room whose
    // whole log was removed still numbers on from its last seq.
    tx.prepare_cached(&format!("UPDATE rooms SET head_seq = {HEAD_SEQ}"))?
        .execute([])?;
    let rooms: Vec<(String, i64)> = tx
        .prepare_cached("SELECT name, head_seq FROM rooms")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut delete_through =
        tx.prepare_cached("DELETE FROM messages WHERE room = ?1 AND seq <= ?2")?;
    let mut newest_expired =
        tx.prepare_cached("SELECT MAX(seq) FROM messages WHERE room = ?1 AND sent_at_us < ?2")?;
    let cutoff = retention
        .max_age
        .and_then(|age| SystemTime::now().checked_sub(age))
        .map(to_micros);
    for (room, head) in rooms {
        if let Some(keep) = retention.max_messages {
            delete_through.execute(params![room, head - seq_to_sql(keep)])?;
        }
        if let Some(cutoff) = cutoff {
            let expired: Option<i64> =
                newest_expired.query_row(params![room, cutoff], |row| row.get(0))?;
            if let Some(through) = expired {
                delete_through.execute(params![room, through])?;
            }
        }
    }
    Ok(())
}

/// A room's head, the last seq ever assigned in it, as SQL over a row of `rooms`: the
/// greater of its `head_seq` column and its log's last seq. Commits write only the log
/// (an `UPDATE` of the room's row with every commit was one more B-tree page in the WAL
/// each time); the column is brought up to date before retention removes messages, so
/// that numbering survives a log emptied by it.
const HEAD_SEQ: &str = "MAX(head_seq, COALESCE((SELECT MAX(seq) FROM messages \
                        WHERE messages.room = rooms.name), 0))";

/// Seqs are u64 in the protocol and INTEGER (i64) in SQLite; no room gets near 2^63.
fn seq_to_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn seq_from_sql(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

/// The idempotency lookup; it must use `messages_by_client_msg_id` (a test checks).
const FIND_SENT: &str = "SELECT seq FROM messages
     WHERE room = ?1 AND sender = ?2 AND client_msg_id = ?3 AND sent_at_us >= ?4
     LIMIT 1";

/// A room's idempotency keys, newest first (the caller stops at its window's start).
const SENT_SINCE: &str = "SELECT sender, client_msg_id, sent_at_us FROM messages
     WHERE room = ?1 ORDER BY seq DESC";

const MESSAGE_COLUMNS: &str = "seq, sender, text, kind, client_msg_id, sent_at_us";

fn message(room: &str, row: &rusqlite::Row<'_>) -> rusqlite::Result<ChatMessage> {
    Ok(ChatMessage::new(ChatMessageRecord {
        room: room.to_owned(),
        seq: seq_from_sql(row.get(0)?),
        sender: row.get(1)?,
        text: row.get(2)?,
        kind: row.get(3)?,
        client_msg_id: row.get(4)?,
        sent_at: Some(from_micros(row.get(5)?).into()),
    }))
}

impl Store for SqliteStore {
    fn rooms(&self) -> Result<Vec<RoomRecord>, StoreError> {
        self.read(|db| {
            let mut rooms: Vec<RoomRecord> = db
                .prepare(&format!(
                    "SELECT name, topic, created_at_us, created_by, {HEAD_SEQ}, private, \
                         epoch FROM rooms"
                ))?
                .query_map([], |row| {
                    Ok(RoomRecord {
                        name: row.get(0)?,
                        topic: row.get(1)?,
                        created_at: from_micros(row.get(2)?),
                        created_by: row.get(3)?,
                        head_seq: seq_from_sql(row.get(4)?),
                        private: row.get(5)?,
                        access: BTreeMap::new(),
                        epoch: row.get(6)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut by_name: HashMap<String, &mut RoomRecord> =
                rooms.iter_mut().map(|r| (r.name.clone(), r)).collect();
            let mut access = db.prepare("SELECT room, user, access FROM room_access")?;
            let mut rows = access.query([])?;
            while let Some(row) = rows.next()? {
                let room: String = row.get(0)?;
                let access = Access::parse(&row.get::<_, String>(2)?);
                if let (Some(record), Some(access)) = (by_name.get_mut(&room), access) {
                    record.access.insert(row.get(1)?, access);
                }
            }
            drop(by_name);
            Ok(rooms)
        })
    }

    fn create_room(&self, room: RoomRecord, done: Committed) {
        self.writer.queue(Write::Room(room, done));
    }

    fn append(&self, message: ChatMessage, done: Committed) -> Lead {
        self.writer.append(Write::Message(message, done))
    }

    fn set_topic(&self, room: &str, topic: &str, done: Committed) {
        self.writer
            .queue(Write::Topic(room.to_owned(), topic.to_owned(), done));
    }

    fn set_access(&self, room: &str, user: &str, access: Option<Access>, done: Committed) {
        self.writer.queue(Write::Access(
            room.to_owned(),
            user.to_owned(),
            access,
            done,
        ));
    }

    fn apply_retention(&self, retention: Retention, done: Committed) {
        self.writer.queue(Write::Retention(retention, done));
    }

    fn read_after(
        &self,
        room: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        self.read(|db| {
            db.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
            ))?
            .query_map(
                params![room, seq_to_sql(after_seq), i64::try_from(limit).unwrap_or(i64::MAX)],
                |row| message(room, row),
            )?
            .collect()
        })
    }

    fn read_before(
        &self,
        room: &str,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let mut messages: Vec<ChatMessage> = self.read(|db| {
            db.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
            ))?
            .query_map(
                params![room, seq_to_sql(before_seq), i64::try_from(limit).unwrap_or(i64::MAX)],
                |row| message(room, row),
            )?
            .collect()
        })?;
        messages.reverse();
        Ok(messages)
    }

    fn first_seq(&self, room: &str) -> Result<Option<u64>, StoreError> {
        let first: Option<i64> = self.read(|db| {
            db.prepare_cached("SELECT MIN(seq) FROM messages WHERE room = ?1")?
                .query_row(params![room], |row| row.get(0))
        })?;
        Ok(first.map(seq_from_sql))
    }

    fn sent_since(&self, room: &str, since: SystemTime) -> Result<Vec<SentKey>, StoreError> {
        let since = to_micros(since);
        self.read(|db| {
            // Newest first along the primary key, stopping at the first message older
            // than `since`: a read the size of the window, not of the room.
            let mut statement = db.prepare_cached(SENT_SINCE)?;
            let mut rows = statement.query(params![room])?;
            let mut keys = Vec::new();
            while let Some(row) = rows.next()? {
                let sent_at: i64 = row.get(2)?;
                if sent_at < since {
                    break;
                }
                keys.push(SentKey {
                    sender: row.get(0)?,
                    client_msg_id: row.get(1)?,
                    sent_at: from_micros(sent_at),
                });
            }
            Ok(keys)
        })
    }

    fn find_sent(
        &self,
        room: &str,
        sender: &str,
        client_msg_id: &str,
        since: SystemTime,
    ) -> Result<Option<u64>, StoreError> {
        let seq: Option<i64> = self.read(|db| {
            db.prepare_cached(FIND_SENT)?
                .query_row(
                    params![room, sender, client_msg_id, to_micros(since)],
                    |row| row.get(0),
                )
                .optional()
        })?;
        Ok(seq.map(seq_from_sql))
    }

    fn close(&self) {
        let (done, _) = super::on_commit();
        self.writer.close(Write::Close(done));
        // Nothing writes any more (the writer and checkpoint threads have exited, and a
        // later write fails as closed): the dir is free for another server.
        self.lock.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::Ordering, time::Duration};

    use super::*;

    fn room(name: &str) -> RoomRecord {
        RoomRecord {
            name: name.into(),
            topic: "t".into(),
            created_at: SystemTime::now(),
            created_by: "alice".into(),
            head_seq: 0,
            private: false,
            access: Default::default(),
            epoch: "e1".into(),
        }
    }

    fn message(room: &str, seq: u64, id: &str) -> ChatMessage {
        ChatMessage::new(ChatMessageRecord {
            room: room.into(),
            seq,
            sender: "alice".into(),
            text: format!("message {seq}"),
            kind: 1,
            client_msg_id: id.into(),
            sent_at: Some(SystemTime::now().into()),
        })
    }

    fn wait(
        store: &SqliteStore,
        write: impl FnOnce(&SqliteStore, Committed),
    ) -> Result<(), StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        write(store, Box::new(move |result| tx.send(result).unwrap()));
        rx.recv().unwrap()
    }

    /// Appends `message`, leading its commit, and waits for the store's answer.
    fn append_led(store: &SqliteStore, message: ChatMessage) -> Result<(), StoreError> {
        wait(store, |s, done| s.append(message, done).commit())
    }

    #[test]
    fn what_is_committed_is_there_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SqliteStore::open(dir.path()).unwrap();
            wait(&store, |s, done| s.create_room(room("r"), done)).unwrap();
            for seq in 1..=5 {
                append_led(&store, message("r", seq, &format!("id{seq}"))).unwrap();
            }
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        let rooms = store.rooms().unwrap();
        assert_eq!(rooms.len(), 1);
        assert_eq!(rooms[0].head_seq, 5);
        let seqs: Vec<u64> = store
            .read_after("r", 2, 10)
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs, [3, 4, 5]);
        let seqs: Vec<u64> = store
            .read_before("r", 5, 2)
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs, [3, 4]);
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(
            store.find_sent("r", "alice", "id4", an_hour_ago).unwrap(),
            Some(4)
        );
        assert_eq!(
            store.find_sent("r", "bob", "id4", an_hour_ago).unwrap(),
            None
        );
        assert_eq!(
            store
                .find_sent(
                    "r",
                    "alice",
                    "id4",
                    SystemTime::now() + Duration::from_secs(1)
                )
                .unwrap(),
            None
        );
    }

    #[test]
    fn readers_share_a_bounded_pool() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        wait(&store, |s, done| s.create_room(room("r"), done)).unwrap();
        append_led(&store, message("r", 1, "a")).unwrap();
        let most = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 * MAX_READERS {
                scope.spawn(|| {
                    for _ in 0..50 {
                        let read = store.read(|_| {
                            most.fetch_max(store.readers.open(), Ordering::SeqCst);
                            Ok(())
                        });
                        read.unwrap();
                        assert_eq!(store.read_after("r", 0, 10).unwrap().len(), 1);
                    }
                });
            }
        });
        let most = most.into_inner();
        assert!(most > 1, "reads ran side by side: {most}");
        assert!(most <= MAX_READERS, "{most} connections open at once");
    }

    #[test]
    fn the_wal_is_copied_in_the_background_and_stays_bounded() {
        use super::super::checkpoint::{HARD_PAGES, LIMIT_PAGES, SOFT_PAGES};
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let database = dir.path().join(DATABASE_FILE);
        let wal = dir.path().join(format!("{DATABASE_FILE}-wal"));
        let size = |path: &Path| std::fs::metadata(path).map_or(0, |m| m.len());
        // The WAL file's high-water mark, in frames of a 4 KiB page.
        let frames = || size(&wal) / (4096 + 24);
        let pages = |n: std::ffi::c_int| u64::try_from(n).unwrap();
        wait(&store, |s, done| s.create_room(room("r"), done)).unwrap();
        let empty = size(&database);
        let mut seq = 0;
        let mut append = |store: &SqliteStore| {
            seq += 1;
            append_led(store, message("r", seq, &format!("id{seq}"))).unwrap();
        };
        // Past the soft point, then nothing more: only a checkpoint writes the database
        // file, and the writer checkpoints only from the hard point, so a file that grows
        // now was grown by the background.
        while frames() < pages(SOFT_PAGES) {
            append(&store);
        }
        assert!(frames() < pages(HARD_PAGES));
        // A bound, not a pause: a missing checkpoint fails the test instead of hanging it.
        assert!(
            store.checkpoints.wait_past(0, Duration::from_secs(60)),
            "no background checkpoint ran"
        );
        assert!(size(&database) > empty, "the background copied nothing");
        // Each commit adds a frame at least: without checkpoints the WAL would pass 3 × the
        // limit. However the background is scheduled, the writer stops it at the limit.
        for _ in 0..3 * pages(LIMIT_PAGES) {
            append(&store);
        }
        let most = pages(LIMIT_PAGES) + 16;
        assert!(frames() <= most, "the WAL grew to {} frames", frames());
        assert_eq!(store.read_after("r", 0, 1).unwrap().len(), 1);
        assert_eq!(store.rooms().unwrap()[0].head_seq, seq);
    }

    /// The name of the thread a write's callback ran on.
    fn committed_on(store: &SqliteStore, write: impl FnOnce(&SqliteStore, Committed)) -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        write(
            store,
            Box::new(move |result| {
                result.unwrap();
                let thread = std::thread::current();
                tx.send(thread.name().unwrap_or("unnamed").to_owned())
                    .unwrap();
            }),
        );
        rx.recv().unwrap()
    }

    #[test]
    fn a_caller_commits_its_own_message_and_the_thread_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let here = std::thread::current().name().unwrap().to_owned();
        let thread = "confab-store-writer";
        assert_eq!(
            committed_on(&store, |s, done| s.create_room(room("r"), done)),
            thread
        );
        store.writer.wait_idle();
        assert_eq!(
            committed_on(&store, |s, done| s
                .append(message("r", 1, "a"), done)
                .commit()),
            here
        );
        // A lead dropped instead of committed goes to the thread.
        assert_eq!(
            committed_on(&store, |s, done| drop(s.append(message("r", 2, "b"), done))),
            thread
        );
        let retention = Retention {
            max_messages: Some(1),
            max_age: None,
        };
        assert_eq!(
            committed_on(&store, |s, done| s.apply_retention(retention, done)),
            thread
        );
        // A message queued behind a lead no one has taken yet is committed with it.
        let (tx, rx) = std::sync::mpsc::channel();
        let reported = move |seq: u64| -> Committed {
            let tx = tx.clone();
            Box::new(move |result| {
                result.unwrap();
                let on = std::thread::current().name().map(str::to_owned);
                tx.send((seq, on)).unwrap();
            })
        };
        store.writer.wait_idle();
        let lead = store.append(message("r", 3, "c"), reported(3));
        let behind = store.append(message("r", 4, "d"), reported(4));
        behind.commit(); // nothing to lead: the first holds the lead
        assert!(
            rx.try_recv().is_err(),
            "nothing is committed before the lead is taken"
        );
        lead.commit();
        let here = Some(here);
        assert_eq!(rx.try_recv().unwrap(), (3, here.clone()));
        assert_eq!(rx.try_recv().unwrap(), (4, here));
    }

    #[test]
    fn messages_from_many_threads_commit_in_the_order_they_queued() {
        const THREADS: u64 = 8;
        const EACH: u64 = 300;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        for t in 0..THREADS {
            wait(&store, |s, done| {
                s.create_room(room(&format!("r{t}")), done)
            })
            .unwrap();
        }
        // Each thread queues its room's messages, taking some leads and dropping others;
        // every callback records its seq, and a room's seqs must be reported in order.
        let reported = Arc::new(Mutex::new(vec![Vec::new(); THREADS as usize]));
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (store, reported) = (&store, reported.clone());
                scope.spawn(move || {
                    let (tx, rx) = std::sync::mpsc::channel();
                    for seq in 1..=EACH {
                        let (tx, reported) = (tx.clone(), reported.clone());
                        let message = message(&format!("r{t}"), seq, &format!("{t}-{seq}"));
                        let lead = store.append(
                            message,
                            Box::new(move |result| {
                                result.unwrap();
                                reported.lock().unwrap()[t as usize].push(seq);
                                tx.send(()).unwrap();
                            }),
                        );
                        if seq % 4 == 0 {
                            drop(lead);
                        } else {
                            lead.commit();
                        }
                    }
                    for _ in 1..=EACH {
                        rx.recv().unwrap();
                    }
                });
            }
        });
        let everything: Vec<u64> = (1..=EACH).collect();
        for (t, seqs) in reported.lock().unwrap().iter().enumerate() {
            assert_eq!(seqs, &everything, "room r{t}'s callbacks");
            let stored: Vec<u64> = store
                .read_after(&format!("r{t}"), 0, 1000)
                .unwrap()
                .iter()
                .map(|m| m.seq)
                .collect();
            assert_eq!(stored, everything, "room r{t}'s log");
        }
    }

    /// What appending `message` (leading it) comes to, if the store says within 20 s.
    fn append_within(
        store: &SqliteStore,
        message: ChatMessage,
    ) -> Result<Result<(), StoreError>, std::sync::mpsc::RecvTimeoutError> {
        let (tx, rx) = std::sync::mpsc::channel();
        store
            .append(message, Box::new(move |result| tx.send(result).unwrap()))
            .commit();
        rx.recv_timeout(Duration::from_secs(20))
    }

    #[test]
    fn a_writer_thread_that_panics_closes_the_store_instead_of_hanging_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.create_room(room("r"), Box::new(|_| panic!("a callback's bug")));
        let (tx, rx) = std::sync::mpsc::channel();
        store.create_room(room("q"), Box::new(move |result| tx.send(result).unwrap()));
        // Failed as closed, or dropped unreported in the group that panicked: either way
        // the sender hears, and the next write too.
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Err(StoreError::Closed)) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
            other => panic!("the write behind the panic: {other:?}"),
        }
        let late = append_within(&store, message("r", 1, "a"));
        assert!(matches!(late, Ok(Err(StoreError::Closed))), "{late:?}");
    }

    #[test]
    fn a_write_after_close_fails_as_closed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        wait(&store, |s, done| s.create_room(room("r"), done)).unwrap();
        store.close();
        let late = append_within(&store, message("r", 1, "a"));
        assert!(matches!(late, Ok(Err(StoreError::Closed))), "{late:?}");
    }

    /// The process holds one exclusive POSIX lock on the database, taken at open, and
    /// nothing else: the writer, the checkpoints and the pooled readers coordinate in
    /// memory. With SQLite's default VFS the process holds a shared lock instead, which
    /// each transaction takes further locks beside (`fcntl` calls), and the WAL's index
    /// is a `-shm` file; here it is in memory.
    #[test]
    #[cfg(target_os = "linux")]
    fn the_process_holds_one_exclusive_lock_and_no_shared_memory_file() {
        use std::os::unix::fs::MetadataExt;

        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        wait(&store, |s, done| s.create_room(room("r"), done)).unwrap();
        for seq in 1..=3 {
            append_led(&store, message("r", seq, &format!("id{seq}"))).unwrap();
            assert_eq!(store.read_after("r", 0, 10).unwrap().len() as u64, seq);
        }
        assert!(store.readers.open() > 0, "a pooled reader was used");

        let path = dir.path().join(DATABASE_FILE);
        // `/proc/locks`: "1: POSIX  ADVISORY  WRITE 4242 fd:01:1234 1073741826 1073742335"
        let inode = format!(":{} ", std::fs::metadata(&path).unwrap().ino());
        let pid = format!(" {} ", std::process::id());
        let locks: Vec<String> = std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .filter(|line| line.contains(&inode) && line.contains(&pid))
            .map(|line| line.split_whitespace().skip(1).take(3).collect())
            .collect();
        assert_eq!(
            locks,
            ["POSIXADVISORYWRITE"],
            "this process's locks on the database"
        );
        let shm = dir.path().join(format!("{DATABASE_FILE}-shm"));
        assert!(!shm.exists(), "the WAL index is in memory, not in {shm:?}");
    }

    #[test]
    fn a_second_server_cannot_open_the_same_dir() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SqliteStore::open(dir.path()).unwrap();
        let second = SqliteStore::open(dir.path());
        assert!(matches!(second, Err(StoreError::InUse(path)) if path == dir.path()));
    }

    /// A stopped server's store is closed while a task that is still ending may hold it:
    /// the dir is free from the close, and what the first store committed is there.
    #[test]
    fn a_closed_store_lets_its_dir_go_while_still_held() {
        let dir = tempfile::tempdir().unwrap();
        let first = SqliteStore::open(dir.path()).unwrap();
        wait(&first, |s, done| s.create_room(room("r"), done)).unwrap();
        append_led(&first, message("r", 1, "a")).unwrap();
        first.close();
        let second = SqliteStore::open(dir.path()).expect("the dir is free once closed");
        let seqs = |store: &SqliteStore| -> Vec<u64> {
            let messages = store.read_after("r", 0, 10).unwrap();
            messages.iter().map(|m| m.seq).collect()
        };
        assert_eq!(seqs(&second), [1]);
        // The first store's last handle goes while the second is open.
        drop(first);
        append_led(&second, message("r", 2, "b")).unwrap();
        assert_eq!(seqs(&second), [1, 2]);
    }

    #[test]
    fn retention_removes_a_prefix_and_keeps_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        wait(&store, |s, done| s.create_room(room("r"), done)).unwrap();
        for seq in 1..=10 {
            append_led(&store, message("r", seq, &seq.to_string())).unwrap();
        }
        let keep_three = Retention {
            max_messages: Some(3),
            max_age: None,
        };
        wait(&store, |s, done| s.apply_retention(keep_three, done)).unwrap();
        assert_eq!(store.first_seq("r").unwrap(), Some(8));
        let everything = Retention {
            max_messages: None,
            max_age: Some(Duration::ZERO),
        };
        wait(&store, |s, done| s.apply_retention(everything, done)).unwrap();
        assert_eq!(store.first_seq("r").unwrap(), None);
        drop(store);
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(
            store.rooms().unwrap()[0].head_seq,
            10,
            "numbering survives retention"
        );
    }

    #[test]
    fn the_idempotency_lookup_uses_its_covering_index() {
        // Without it, every send scans its room: appends slow down as the room grows.
        let dir = tempfile::tempdir().unwrap();
        let _store = SqliteStore::open(dir.path()).unwrap();
        let db = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        let plan: Vec<String> = db
            .prepare(&format!("EXPLAIN QUERY PLAN {FIND_SENT}"))
            .unwrap()
            .query_map(params!["r", "alice", "id", 0], |row| row.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            plan,
            [
                "SEARCH messages USING COVERING INDEX messages_by_client_msg_id \
              (room=? AND sender=? AND client_msg_id=? AND sent_at_us>?)"
            ]
        );
    }

    #[test]
    fn a_database_of_the_first_schema_is_migrated_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A data dir as the first released server left it: schema 1, one room, two
            // messages.
            let db = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
            db.execute_batch(MIGRATIONS[0]).unwrap();
            db.pragma_update(None, "user_version", 1).unwrap();
            db.execute(
                "INSERT INTO rooms (name, topic, created_at_us, created_by, head_seq)
                 VALUES ('old', 'from v1', 1700000000000000, 'alice', 2)",
                [],
            )
            .unwrap();
            for seq in 1..=2i64 {
                db.execute(
                    "INSERT INTO messages (room, seq, sender, text, kind, client_msg_id, sent_at_us)
                     VALUES ('old', ?1, 'alice', 'hello', 1, ?2, ?3)",
                    params![seq, format!("id-{seq}"), to_micros(SystemTime::now())],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        let rooms = store.rooms().unwrap();
        assert_eq!(rooms.len(), 1);
        let old = &rooms[0];
        assert_eq!(
            (old.name.as_str(), old.topic.as_str(), old.head_seq),
            ("old", "from v1", 2)
        );
        assert_eq!((old.private, old.access.len()), (false, 0));
        let seqs: Vec<u64> = store
            .read_after("old", 0, 10)
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs, [1, 2]);
        // What schema 2 added works on the migrated data.
        wait(&store, |s, done| {
            s.set_access("old", "bob", Some(Access::Banned), done)
        })
        .unwrap();
        let version: i64 = Connection::open(dir.path().join(DATABASE_FILE))
            .unwrap()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(usize::try_from(version).unwrap(), MIGRATIONS.len());
        assert_eq!(
            store.rooms().unwrap()[0].access.get("bob"),
            Some(&Access::Banned)
        );
    }

    #[test]
    fn a_schema_newer_than_the_server_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
            db.pragma_update(None, "user_version", 99).unwrap();
        }
        assert!(matches!(
            SqliteStore::open(dir.path()),
            Err(StoreError::NewerSchema { found: 99, .. })
        ));
    }
}
