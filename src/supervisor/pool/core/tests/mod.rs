//! Every transition of the pool core, as tables of inputs and the effects they must write.
//! Effects are shown as short strings ("launch 0#1", "place 1 a", "finish a QueueFull") so a
//! case reads as what the actor would do.

mod harness;

use super::scale::AUTOSCALE_KEEPALIVE;
use super::*;
use harness::{rules, shown, Pool, J};

use InstanceState::{Backoff as InBackoff, Crashed, Failed, Ready, Starting, Stopped, Stopping};

#[test]
fn tasks_wait_for_a_ready_instance_then_go_to_the_least_loaded() {
    let mut p = Pool::new(2, 0, rules(2, 10));
    assert_eq!(p.run("a"), Vec::<String>::new(), "no instance is ready yet");
    assert_eq!(*p.core.state(), PluginState::Starting);
    assert_eq!(p.ready(1), ["started 1"]);
    assert_eq!(*p.core.state(), PluginState::Running);
    assert_eq!(p.place(), ["place 1 a"]);
    assert_eq!(p.ready(0), ["started 0"]);
    assert_eq!(p.run("b"), ["place 0 b"], "slot 0 has fewer in flight");
    assert_eq!(p.run("c"), ["place 0 c"], "a tie goes to the lowest index");
    assert_eq!(p.run("d"), ["place 1 d"]);
    assert_eq!(p.run("e"), Vec::<String>::new(), "both at concurrency 2");
    assert_eq!(p.core.queued(), 1);
    assert_eq!(p.finished(0, "b", true), Vec::<String>::new());
    assert_eq!(p.place(), ["place 0 e"]);
    let s = &p.core.slots()[0];
    assert_eq!((s.in_flight, s.done, s.failed), (2, 1, 0));
    p.finished(1, "a", false);
    assert_eq!(p.core.slots()[1].failed, 1);
    let mut placed: Vec<_> = p.core.placements().map(|(id, s)| (id.clone(), s)).collect();
    placed.sort();
    assert_eq!(placed, [("c".into(), 0), ("d".into(), 1), ("e".into(), 0)]);
}

#[test]
fn reports_from_a_previous_process_of_the_slot_are_ignored() {
    let mut p = Pool::new(1, 1, rules(1, 10));
    p.run("a");
    let old = p.generation(0);
    assert_eq!(
        p.crash(0),
        ["reap 0", "exited 0 expected=false", "launch 0#2"]
    );
    let stale = [
        Input::Ready {
            slot: 0,
            generation: old,
            pid: 9,
            plugin_version: "1".into(),
        },
        Input::Finished {
            slot: 0,
            generation: old,
            task_id: "a".into(),
            ok: true,
        },
        Input::Exited {
            slot: 0,
            generation: old,
            reason: ExitReason::Stopped,
            ran_for: Duration::ZERO,
        },
        Input::Ready {
            slot: 5,
            generation: 1,
            pid: 9,
            plugin_version: "1".into(),
        },
    ];
    for input in stale {
        let what = format!("{input:?}");
        assert_eq!(p.input(input), Vec::<String>::new(), "{what}");
    }
    assert_eq!(p.states(), [Starting]);
    assert_eq!(p.core.slots()[0].done, 0);
}

#[test]
fn the_door_refuses_when_full_failed_or_stopping() {
    let mut p = Pool::new(1, 0, rules(1, 2));
    p.run("a");
    p.run("b");
    assert_eq!(p.run("c"), ["finish c QueueFull"]);
    assert_eq!(
        p.input(Input::Stop {
            grace: Duration::ZERO
        }),
        [
            "finish a PluginRejected",
            "finish b PluginRejected",
            "stop 0"
        ]
    );
    assert_eq!(p.run("d"), ["finish d PluginUnavailable"]);
}

#[test]
fn a_cancel_drops_a_queued_task_and_forwards_a_running_one_once_per_strength() {
    let mut p = Pool::new(1, 1, rules(1, 10));
    p.run("running");
    p.run("queued");
    let cases = [
        (
            "queued",
            CancelMode::QueuedOnly,
            CancelStep::Dropped,
            vec!["finish queued TaskCancelled"],
        ),
        (
            "running",
            CancelMode::QueuedOnly,
            CancelStep::NotHere,
            vec![],
        ),
        (
            "running",
            CancelMode::Cooperative,
            CancelStep::Running {
                slot: 0,
                escalate: false,
            },
            vec![],
        ),
        // Asked again as hard or softer: nothing more goes to the instance.
        (
            "running",
            CancelMode::Cooperative,
            CancelStep::Asked,
            vec![],
        ),
        (
            "running",
            CancelMode::Escalate,
            CancelStep::Running {
                slot: 0,
                escalate: true,
            },
            vec![],
        ),
        ("running", CancelMode::Escalate, CancelStep::Asked, vec![]),
        (
            "running",
            CancelMode::Cooperative,
            CancelStep::Asked,
            vec![],
        ),
        ("unknown", CancelMode::Escalate, CancelStep::NotHere, vec![]),
        ("queued", CancelMode::Escalate, CancelStep::NotHere, vec![]),
    ];
    for (id, mode, step, effects) in cases {
        assert_eq!(
            p.cancel(id, mode),
            (step, effects.iter().map(|s| s.to_string()).collect()),
            "{id} {mode:?}"
        );
    }
    assert_eq!(p.core.queued(), 0);
}

#[test]
fn a_placement_the_instance_refused_waits_at_the_front_of_the_queue() {
    let mut p = Pool::new(2, 2, rules(1, 10));
    p.input(Input::Run(J("a".into())));
    p.input(Input::Run(J("b".into())));
    assert_eq!(p.place(), ["place 0 a", "place 1 b"]);
    assert_eq!(
        p.input(Input::PlaceRefused {
            slot: 0,
            job: J("a".into())
        }),
        Vec::<String>::new()
    );
    assert_eq!(p.states(), [Crashed, Ready]);
    assert_eq!(p.core.slots()[0].in_flight, 0);
    assert_eq!(p.core.placements().count(), 1);
    p.input(Input::Run(J("c".into())));
    p.finished(1, "b", true);
    assert_eq!(p.place(), ["place 1 a"], "the refused one goes first");
}

#[test]
fn a_crash_restarts_at_once_then_after_a_growing_backoff() {
    let mut p = Pool::new(1, 1, rules(1, 10));
    p.run("a");
    assert_eq!(
        p.crash(0),
        ["reap 0", "exited 0 expected=false", "launch 0#2"]
    );
    assert_eq!(
        p.core.placements().count(),
        0,
        "its tasks were answered by the instance"
    );
    assert_eq!(p.core.slots()[0].restarts, 1);
    assert_eq!(p.crash(0), ["reap 0", "exited 0 expected=false"]);
    assert_eq!(p.states(), [InBackoff]);
    let due = p.core.next_timer().expect("a restart is scheduled");
    assert!(due > p.now.at());
    assert_eq!(p.input(Input::Timers), Vec::<String>::new(), "not due yet");
    p.set_at(due);
    assert_eq!(p.input(Input::Timers), ["launch 0#3"]);
    assert_eq!(p.core.next_timer(), None);
    assert_eq!(p.states(), [Starting]);
    assert_eq!(p.core.last_exit().map(String::as_str), Some("boom"));
    let exits = &p.core.slots()[0].recent_exits;
    assert_eq!(exits.len(), 2);
}

#[test]
fn too_many_crashes_fail_the_plugin_until_its_retry_or_a_restart() {
    let mut p = Pool::new(2, 2, rules(1, 10));
    p.run("a");
    p.run("b");
    p.run("queued");
    for _ in 0..3 {
        p.crash(0);
        let at = p.core.next_timer();
        if let Some(at) = at {
            p.set_at(at);
            p.input(Input::Timers);
        }
    }
    let gave_up = p.crash(0);
    assert_eq!(
        gave_up,
        [
            "reap 0",
            "exited 0 expected=false",
            "finish queued PluginUnavailable",
            "stop 1",
            "failed 0"
        ]
    );
    assert!(matches!(p.core.state(), PluginState::Failed(r) if r.contains("restarted 3 times")));
    assert_eq!(p.run("late"), ["finish late PluginUnavailable"]);
    assert_eq!(
        p.exited(1, ExitReason::Stopped, Duration::ZERO),
        ["reap 1", "exited 1 expected=true"]
    );
    assert_eq!(p.states(), [Failed, Stopped]);
    // Tried again on its own once `failed_retry` has passed: a fresh budget, every slot started.
    assert_eq!(
        p.core.next_timer(),
        Some(p.now.at() + Duration::from_secs(300))
    );
    p.advance(Duration::from_secs(300));
    assert_eq!(p.input(Input::Timers), ["launch 0#5", "launch 1#2"]);
    assert_eq!(*p.core.state(), PluginState::Starting);
    assert_eq!(
        p.crash(0),
        ["reap 0", "exited 0 expected=false", "launch 0#6"],
        "a fresh budget"
    );
}

#[test]
fn an_operator_restart_revives_only_a_failed_plugin() {
    let mut p = Pool::new(1, 1, rules(1, 10));
    let mut out = Vec::new();
    assert!(!p.core.restart(p.now, &mut out));
    assert!(out.is_empty());
    let incompatible = p.exited(
        0,
        ExitReason::Incompatible("protocol 9".into()),
        Duration::ZERO,
    );
    assert_eq!(
        incompatible,
        ["reap 0", "exited 0 expected=false", "failed 0"]
    );
    assert_eq!(*p.core.state(), PluginState::Failed("protocol 9".into()));
    assert!(p.core.restart(p.now, &mut out));
    assert_eq!(shown(&out), ["launch 0#2"]);
    assert_eq!(p.core.retry_failed_at(), None);
}

#[test]
fn a_stop_ends_when_every_process_is_gone() {
    let mut p = Pool::new(3, 2, rules(1, 10));
    p.run("a");
    p.crash(1);
    p.crash(1);
    assert_eq!(p.states(), [Ready, InBackoff, Starting]);
    let stop = p.input(Input::Stop {
        grace: Duration::from_secs(1),
    });
    assert_eq!(
        stop,
        ["stop 0", "stop 2"],
        "the slot in backoff has no process"
    );
    assert_eq!(p.states(), [Stopping, Stopped, Stopping]);
    assert_eq!(p.core.next_timer(), None, "no restart after a stop");
    assert_eq!(
        p.input(Input::Stop {
            grace: Duration::ZERO
        }),
        Vec::<String>::new(),
        "once"
    );
    p.crash(2);
    assert_eq!(*p.core.state(), PluginState::Stopping);
    assert_eq!(
        p.states(),
        [Stopping, Stopped, Stopped],
        "no restart while stopping"
    );
    assert_eq!(
        p.exited(0, ExitReason::Stopped, Duration::ZERO),
        ["reap 0", "exited 0 expected=true"]
    );
    assert_eq!(*p.core.state(), PluginState::Stopped);
}

#[test]
fn an_instance_stopped_while_the_plugin_lives_is_started_again() {
    // Revived while the failed plugin's other instance was still ending.
    let mut p = Pool::new(2, 2, rules(1, 10));
    let gave_up = p.exited(0, ExitReason::Incompatible("x".into()), Duration::ZERO);
    assert_eq!(
        gave_up,
        ["reap 0", "exited 0 expected=false", "stop 1", "failed 0"]
    );
    let mut out = Vec::new();
    assert!(p.core.restart(p.now, &mut out));
    assert_eq!(shown(&out), ["launch 0#2"], "slot 1 still has its process");
    let stopped = p.exited(1, ExitReason::Stopped, Duration::ZERO);
    assert_eq!(stopped, ["reap 1", "exited 1 expected=true", "launch 1#2"]);
}

#[test]
fn shrinking_retires_the_highest_slots_once_idle_and_growing_brings_them_back() {
    let mut p = Pool::new(1, 1, rules(1, 10));
    assert_eq!(
        p.scale(Scale::By(2)),
        (Ok(3), vec!["launch 1#1".into(), "launch 2#1".into()])
    );
    p.ready(1);
    p.ready(2);
    p.run("a");
    p.run("b");
    p.run("c");
    assert_eq!(p.core.placements().count(), 3);
    p.finished(2, "c", true);
    assert_eq!(
        p.scale(Scale::By(-2)),
        (Ok(1), vec!["stop 2".into()]),
        "slot 1 still runs b"
    );
    assert_eq!(p.states(), [Ready, Stopping, Stopping]);
    assert_eq!(
        p.run("d"),
        Vec::<String>::new(),
        "a retired slot takes no task"
    );
    assert_eq!(p.finished(1, "b", true), ["stop 1"]);
    assert_eq!(
        p.crash(2),
        ["reap 2", "exited 2 expected=false"],
        "retired: never restarted"
    );
    assert_eq!(p.states(), [Ready, Stopping, Stopped]);
    assert_eq!(p.scale(Scale::By(-5)), (Ok(1), vec![]), "never below one");
    // Slot 2 has ended: started again. Slot 1 was told to stop: it starts again once exited.
    assert_eq!(p.scale(Scale::By(2)), (Ok(3), vec!["launch 2#2".into()]));
    assert_eq!(
        p.exited(1, ExitReason::Stopped, Duration::ZERO),
        ["reap 1", "exited 1 expected=true", "launch 1#2"]
    );
}

#[test]
fn a_retired_slot_not_yet_stopped_comes_back_as_it_was() {
    let mut p = Pool::new(2, 2, rules(1, 10));
    p.run("a");
    p.run("b");
    assert_eq!(
        p.scale(Scale::By(-1)),
        (Ok(1), vec![]),
        "slot 1 still runs b"
    );
    assert_eq!(p.scale(Scale::By(1)), (Ok(2), vec![]));
    assert_eq!(p.states(), [Ready, Ready]);
    assert_eq!(
        p.finished(1, "b", true),
        Vec::<String>::new(),
        "no longer retired"
    );
}

#[test]
fn autoscale_grows_while_tasks_wait_and_shrinks_after_the_keepalive() {
    let mut p = Pool::new(1, 1, rules(1, 10));
    assert_eq!(p.scale(Scale::Auto { min: 1, max: 2 }), (Ok(1), vec![]));
    assert_eq!(
        p.scale(Scale::By(1)).0,
        Err("not supported with autoscale: adjust the autoscale range instead".into())
    );
    assert!(p.core.autoscaling());
    p.run("a");
    assert_eq!(
        p.input(Input::AutoscaleTick),
        Vec::<String>::new(),
        "nothing waits"
    );
    p.run("b");
    assert_eq!(p.input(Input::AutoscaleTick), ["launch 1#1"]);
    p.ready(1);
    assert_eq!(p.place(), ["place 1 b"]);
    p.run("c");
    assert_eq!(
        p.input(Input::AutoscaleTick),
        Vec::<String>::new(),
        "at max"
    );
    p.finished(0, "a", true);
    p.place();
    p.finished(0, "c", true);
    p.finished(1, "b", true);
    p.advance(AUTOSCALE_KEEPALIVE);
    assert_eq!(p.input(Input::AutoscaleTick), ["stop 1"]);
    assert_eq!(p.core.active_instances(), 1);
    assert_eq!(
        p.input(Input::AutoscaleTick),
        Vec::<String>::new(),
        "at min"
    );
    // Bounds are ordered; a count outside them is brought in (slot 1 back from retirement).
    assert_eq!(p.scale(Scale::Auto { min: 3, max: 2 }), (Ok(2), vec![]));
}

#[test]
fn scaling_a_failed_or_stopped_plugin_adds_slots_without_processes() {
    let mut p = Pool::new(1, 1, rules(1, 10));
    p.input(Input::Stop {
        grace: Duration::ZERO,
    });
    assert_eq!(p.scale(Scale::By(1)), (Ok(2), vec![]));
    assert!(!p.core.slots()[1].process);
}

#[test]
fn events_go_to_the_first_ready_instance() {
    let mut p = Pool::new(3, 0, rules(1, 10));
    assert_eq!(p.core.event_taker(), None);
    p.ready(2);
    assert_eq!(p.core.event_taker(), Some(2));
    p.ready(1);
    assert_eq!(p.core.event_taker(), Some(1));
    p.crash(1);
    assert_eq!(p.core.event_taker(), Some(2));
}

#[test]
fn a_failed_plugins_refusal_says_when_it_is_tried_next() {
    let mut p = Pool::new(1, 1, rules(1, 10));
    p.exited(0, ExitReason::Incompatible("x".into()), Duration::ZERO);
    let mut out = Vec::new();
    p.core.handle(Input::Run(J("a".into())), p.now, &mut out);
    let Some(Effect::Finish { failure, .. }) = out.first() else {
        panic!("refused: {:?}", shown(&out));
    };
    assert_eq!(
        failure.message,
        "plugin `p` is failed: x; next try in 5m (`restart.failed_retry`; or `worker plugins restart p`)"
    );
}
