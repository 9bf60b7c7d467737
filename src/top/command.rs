//! The terminal loop of `lm-sandbox top`: poll, draw, repeat until `q` (or Esc, Ctrl-C).

use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};

use super::{render, Snapshot, View};
use crate::cli::TopArgs;

pub fn run(args: &TopArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let interval = Duration::from_secs_f64(args.interval.max(0.2));
    let mut terminal = ratatui::init();
    let mut before: Option<Snapshot> = None;
    let result = (|| -> anyhow::Result<()> {
        loop {
            let view = match runtime.block_on(Snapshot::fetch(
                &client,
                &args.url,
                args.api_key.as_deref(),
            )) {
                Ok(now) => {
                    let view = View::new(&args.url, &now, before.as_ref());
                    before = Some(now);
                    view
                }
                Err(err) => View {
                    url: args.url.clone(),
                    models: Vec::new(),
                    gpus: Vec::new(),
                    in_flight: None,
                    shed: None,
                    note: Some(err.to_string()),
                },
            };
            terminal.draw(|frame| render(frame, &view))?;
            if event::poll(interval)? {
                if let Event::Key(key) = event::read()? {
                    let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL)
                        && key.code == KeyCode::Char('c');
                    if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}
