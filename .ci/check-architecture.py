"""Checks that what ARCHITECTURE.md names exists, so that the map stays true.

Every `backticked` name in ARCHITECTURE.md that looks like a path in this repository
(`server/src/hub.rs`, `tests/common/`) must exist, and every one that looks like a code
symbol must be defined in the Rust sources:

- `Type`, `Type::item`, `module::Type` (CamelCase): a struct, enum, trait, type alias or
  enum variant of that name; with `::item`, a fn, const or variant `item` as well;
- `module::function` or `Type::method` (snake_case after `::`): a fn of that name, and
  a module or type of the left-hand name.

Flags (`--data-dir`), protocol names (`chat.v1`, `send.text`), code fragments with spaces
or punctuation, and names outside the repository's own code (`tokio::sync::broadcast`)
are not checked. Prints what is missing and exits 1 if anything is.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "ARCHITECTURE.md"
SOURCES = [ROOT / d for d in ["src", "server", "tui-client", "tests", "build.rs"]]
PATH_SUFFIXES = (".rs", ".toml", ".md", ".sh", ".py", ".proto", ".yaml", ".lock")
# Crates whose paths the map names as they are, not as this repository's code.
FOREIGN = {"tokio", "std", "tonic", "prost", "hyper", "h2", "futures", "dashmap", "axum",
           "rusqlite", "governor", "tracing", "ratatui", "crossterm", "jsonwebtoken",
           "tonic_health", "tonic_types", "tonic_reflection", "tonic_web", "unicode_security",
           "precis_profiles", "broadcast", "mpsc", "oneshot", "watch", "google", "grpc",
           "redis",
           # Types of those crates the map mentions by name.
           "DashMap", "Deref", "Drop", "Lagged", "SelectAll", "StreamMap", "Sender", "Arc",
           "Mutex", "Instant", "Status", "Interceptor", "Widget", "TestBackend", "EventStream",
           "ConnectionManager", "ClusterConnection", "Script"}


def rust_sources():
    for root in SOURCES:
        if root.is_file():
            yield root
            continue
        for path in root.rglob("*.rs"):
            if "target" not in path.parts and "fuzz" not in path.parts[:3]:
                yield path


def definitions():
    """Every name the Rust sources define, by kind."""
    types, fns, modules = set(), set(), set()
    item = re.compile(
        r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:async\s+)?(?:unsafe\s+)?"
        r"(struct|enum|trait|type|fn|const|static|mod|macro_rules!)\s+([A-Za-z_][A-Za-z0-9_]*)",
        re.M,
    )
    variant = re.compile(r"^\s{4,}([A-Z][A-Za-z0-9_]*)\s*(?:[({,]|$)", re.M)
    for path in rust_sources():
        text = path.read_text(encoding="utf-8", errors="replace")
        # Re-exports under names of their own (`pub use record::ChatMessage as ChatMessageRecord`).
        types.update(re.findall(r"\buse\s+[\w:]+\s+as\s+([A-Z]\w*)", text))
        # Types build.rs makes under names of its own.
        if path.name == "build.rs":
            types.update(re.findall(r'"([A-Z][A-Za-z0-9]+)"', text))
        modules.add(path.stem)
        for kind, name in item.findall(text):
            if kind in ("struct", "enum", "trait", "type"):
                types.add(name)
            elif kind in ("fn", "const", "static", "macro_rules!"):
                fns.add(name)
            elif kind == "mod":
                modules.add(name)
        types.update(variant.findall(text))
    # Generated code: the protocol's messages and services are types too.
    for proto in (ROOT / "proto").rglob("*.proto"):
        text = proto.read_text(encoding="utf-8")
        types.update(re.findall(r"^\s*(?:message|enum|service)\s+([A-Za-z0-9_]+)", text, re.M))
        types.update(re.findall(r"^\s*rpc\s+([A-Za-z0-9_]+)", text, re.M))
        fns.update(re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()
                   for name in re.findall(r"^\s*rpc\s+([A-Za-z0-9_]+)", text, re.M))
    return types, fns, modules


def main():
    doc = DOC.read_text(encoding="utf-8")
    types, fns, modules = definitions()
    missing = []
    for name in sorted(set(re.findall(r"`([^`\n]+)`", doc))):
        name = name.strip()
        candidate = name.rstrip("/")
        looks_like_path = "/" in candidate and " " not in candidate and not candidate.startswith(("-", "http", "/", "..", "<")) \
            or candidate.endswith(PATH_SUFFIXES) and " " not in candidate
        if candidate.startswith("."):
            continue
        if looks_like_path:
            # `server/src/validate.rs`, `pagination.rs` beside it: a bare file name is
            # checked to exist somewhere in the tree.
            if "*" in candidate:
                if not any(ROOT.glob(candidate)):
                    missing.append(f"path {name}")
            elif "/" in candidate:
                if not (ROOT / candidate).exists():
                    missing.append(f"path {name}")
            elif not any(p.name == candidate for p in ROOT.rglob(candidate) if "target" not in p.parts):
                missing.append(f"file {name}")
            continue
        symbol = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:::([A-Za-z_][A-Za-z0-9_]*))*(?:\(\))?", name)
        if not symbol:
            continue
        parts = name.removesuffix("()").split("::")
        if parts[0] in FOREIGN or parts[0] in ("confab", "confab_server", "crate", "pb", "chat_response", "chat_request"):
            parts = [p for p in parts if p not in ("confab", "confab_server", "crate")]
            if not parts or parts[0] in FOREIGN:
                continue
            if parts[0] in ("pb", "chat_response", "chat_request"):
                parts = parts[1:]
        if not parts:
            continue
        if len(parts) == 1:
            (only,) = parts
            # Only CamelCase names are symbols on their own; a lone snake_case word is
            # usually prose (`seq`, `after_seq`).
            if re.fullmatch(r"[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*", only) and only not in types \
                    and only not in FOREIGN:
                missing.append(f"type {name}")
            continue
        owner, member = parts[-2], parts[-1]
        owner_known = owner in types or owner in modules
        member_known = member in fns or member in types or member in modules
        if not (owner_known and member_known):
            missing.append(f"symbol {name}")
    if missing:
        print("ARCHITECTURE.md names what the code does not have:")
        for item in missing:
            print(f"  - {item}")
        sys.exit(1)
    print("ARCHITECTURE.md: every path and symbol it names exists")


if __name__ == "__main__":
    main()
