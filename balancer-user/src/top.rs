//! `balancer top`: a live terminal view of a running agent. Once a second it asks the agent
//! for its counters through the control socket (so it works from any shell) and shows, per
//! service and backend, what is held and the rates since the last refresh.

use std::time::{Duration, Instant};

use anyhow::Result;
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::{
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Cell, Paragraph, Row, Table},
    DefaultTerminal, Frame,
};
use serde_json::Value;

use crate::control::{self, Request};

const REFRESH: Duration = Duration::from_secs(1);

/// Runs the view until q, Esc or Ctrl-C; the terminal is restored however it ends.
pub fn run(instance: &str) -> Result<()> {
    let mut terminal = ratatui::init();
    let result = watch(&mut terminal, instance);
    ratatui::restore();
    result
}

fn watch(terminal: &mut DefaultTerminal, instance: &str) -> Result<()> {
    let mut previous: Option<(Instant, Value)> = None;
    loop {
        let now = Instant::now();
        let current = control::send(instance, &Request::Top)
            .map_err(|error| format!("{error:#}"))
            .and_then(|text| serde_json::from_str::<Value>(&text).map_err(|e| e.to_string()));
        terminal.draw(|frame| match &current {
            Ok(current) => draw(frame, instance, current, previous.as_ref(), now),
            Err(error) => draw_error(frame, instance, error),
        })?;
        if let Ok(current) = current {
            previous = Some((now, current));
        }
        let deadline = now + REFRESH;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !event::poll(left)? {
                break;
            }
            if let Event::Key(key) = event::read()? {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                let quit = matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c;
                if key.kind == KeyEventKind::Press && quit {
                    return Ok(());
                }
            }
        }
    }
}

/// The rate of counter `field` of `current` since `previous` (0 on the first refresh).
fn rate(current: &Value, previous: Option<(&Value, f64)>, field: &str) -> f64 {
    let Some((previous, seconds)) = previous else {
        return 0.0;
    };
    let now = current[field].as_u64().unwrap_or(0);
    let before = previous[field].as_u64().unwrap_or(0);
    now.saturating_sub(before) as f64 / seconds.max(1e-3)
}

fn draw(
    frame: &mut Frame,
    instance: &str,
    current: &Value,
    previous: Option<&(Instant, Value)>,
    now: Instant,
) {
    let previous = previous.map(|(at, value)| (value, now.duration_since(*at).as_secs_f64()));
    let sources = current["top_sources"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let [header, table, sources_area, footer] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(3),
        Constraint::Length(sources.len().max(1) as u16 + 3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let summary = format!(
        "forwarded {:.0} pkt/s   dropped {:.0} pkt/s   refused {:.0}/s   passed {:.0} pkt/s   cookies issued {:.0}/s   bindings {}/{}",
        rate(current, previous, "forwarded"),
        rate(current, previous, "dropped"),
        rate(current, previous, "refused"),
        rate(current, previous, "passed"),
        rate(current, previous, "cookies_issued"),
        current["tables"]["bindings"]["entries"],
        current["tables"]["bindings"]["capacity"],
    );
    frame.render_widget(
        Paragraph::new(summary)
            .block(Block::bordered().title(format!(" balancer top: {instance} "))),
        header,
    );
    let backends = current["backends"].as_array().cloned().unwrap_or_default();
    let before_of = |service: &Value, backend: &Value| {
        previous.and_then(|(value, seconds)| {
            value["backends"]
                .as_array()?
                .iter()
                .find(|b| &b["service"] == service && &b["backend"] == backend)
                .map(|b| (b, seconds))
        })
    };
    let rows = backends.iter().map(|b| {
        let before = before_of(&b["service"], &b["backend"]);
        let mbits = |field| format!("{:.1}", rate(b, before, field) * 8.0 / 1e6);
        let text = |field: &str| b[field].as_str().unwrap_or("?").to_owned();
        Row::new([
            Cell::from(text("service")),
            Cell::from(text("backend")),
            Cell::from(text("state")),
            Cell::from(if b["healthy"].as_bool() == Some(true) {
                "ok"
            } else {
                "failing"
            }),
            Cell::from(b["weight"].to_string()),
            Cell::from(b["sessions"].to_string()),
            Cell::from(b["active_flows"].to_string()),
            Cell::from(format!("{:.0}", rate(b, before, "new_flows"))),
            Cell::from(format!("{:.0}", rate(b, before, "bound"))),
            Cell::from(mbits("to_backend_bytes")),
            Cell::from(mbits("to_client_bytes")),
            Cell::from(format!(
                "{:.0}",
                rate(b, before, "to_backend_packets") + rate(b, before, "to_client_packets")
            )),
        ])
    });
    let header_row = Row::new([
        "SERVICE",
        "BACKEND",
        "STATE",
        "HEALTH",
        "WEIGHT",
        "SESSIONS",
        "FLOWS",
        "NEW/s",
        "BOUND/s",
        "IN Mbit/s",
        "OUT Mbit/s",
        "PKT/s",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let widths = [
        Constraint::Min(10),
        Constraint::Min(10),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Length(11),
        Constraint::Length(9),
    ];
    frame.render_widget(
        Table::new(rows, widths)
            .header(header_row)
            .block(Block::bordered().title(" backends ")),
        table,
    );
    let source_rows = sources.iter().map(|s| {
        let flows = s["new_flows_last_minute"].as_u64().unwrap_or(0);
        let overcount = s["overcount"].as_u64().unwrap_or(0);
        Row::new([
            Cell::from(s["source"].as_str().unwrap_or("?").to_owned()),
            Cell::from(flows.to_string()),
            Cell::from(format!(
                "{:.1}",
                s["new_flows_per_second"].as_f64().unwrap_or(0.0)
            )),
            Cell::from(if overcount > 0 {
                format!("≤{overcount} over")
            } else {
                "exact".to_owned()
            }),
            Cell::from(s["service"].as_str().unwrap_or("?").to_owned()),
        ])
    });
    let source_header = Row::new([
        "SOURCE",
        "NEW FLOWS/min",
        "NEW/s 10s",
        "COUNT",
        "LATEST SERVICE",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let source_widths = [
        Constraint::Min(20),
        Constraint::Length(14),
        Constraint::Length(10),
        Constraint::Length(14),
        Constraint::Min(10),
    ];
    frame.render_widget(
        Table::new(source_rows, source_widths)
            .header(source_header)
            .block(Block::bordered().title(" top sources by new flows, last minute ")),
        sources_area,
    );
    frame.render_widget(
        Line::from(" q quits; rates are per second since the last refresh (every 1 s)"),
        footer,
    );
}

fn draw_error(frame: &mut Frame, instance: &str, error: &str) {
    frame.render_widget(
        Paragraph::new(format!(
            "the agent does not answer: {error}\nretrying every second; q quits"
        ))
        .block(Block::bordered().title(format!(" balancer top: {instance} "))),
        frame.area(),
    );
}
