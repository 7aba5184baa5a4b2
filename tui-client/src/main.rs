//! `confab`, the Confab terminal client. The interactive client is the subject of its own
//! issue; until it lands this binary says so instead of pretending.

fn main() {
    eprintln!("confab: the terminal client is not built yet; see the README for grpcurl usage");
    std::process::exit(2);
}
