//! Finished outcomes waiting for the consumer, in completion or input order.

use std::collections::VecDeque;

use super::policy::Outcome;

/// The outcomes held between the work that produced them and the consumer.
///
/// In input order, the buffer keeps one slot for every item from the oldest
/// one not yet handed out to the newest one started, so its length bounds the
/// reorder window.
#[derive(Debug)]
pub(crate) enum OutcomeBuffer<T, E> {
    Completion(VecDeque<Outcome<T, E>>),
    Input {
        next_index: u64,
        slots: VecDeque<Slot<T, E>>,
    },
}

#[derive(Debug)]
pub(crate) enum Slot<T, E> {
    Running,
    Finished(Outcome<T, E>),
    Cancelled,
}

impl<T, E> OutcomeBuffer<T, E> {
    pub(crate) fn new(input_order: bool) -> Self {
        if input_order {
            OutcomeBuffer::Input {
                next_index: 0,
                slots: VecDeque::new(),
            }
        } else {
            OutcomeBuffer::Completion(VecDeque::new())
        }
    }

    /// Returns how many buffer places are in use, counting `running` work.
    pub(crate) fn occupied(&self, running: usize) -> usize {
        match self {
            OutcomeBuffer::Completion(ready) => ready.len() + running,
            OutcomeBuffer::Input { slots, .. } => slots.len(),
        }
    }

    pub(crate) fn is_input_order(&self) -> bool {
        matches!(self, OutcomeBuffer::Input { .. })
    }

    pub(crate) fn is_empty(&self) -> bool {
        match self {
            OutcomeBuffer::Completion(ready) => ready.is_empty(),
            OutcomeBuffer::Input { slots, .. } => slots.is_empty(),
        }
    }

    /// Reserves the slot of an item whose work just started, or, in a keyed
    /// backlog, of an item just pulled into the look-ahead window.
    pub(crate) fn started(&mut self) {
        if let OutcomeBuffer::Input { slots, .. } = self {
            slots.push_back(Slot::Running);
        }
    }

    pub(crate) fn finished(&mut self, outcome: Outcome<T, E>) {
        match self {
            OutcomeBuffer::Completion(ready) => ready.push_back(outcome),
            OutcomeBuffer::Input { next_index, slots } => {
                let position = (outcome.index - *next_index) as usize;
                slots[position] = Slot::Finished(outcome);
            }
        }
    }

    pub(crate) fn cancelled(&mut self, index: u64) {
        if let OutcomeBuffer::Input { next_index, slots } = self {
            slots[(index - *next_index) as usize] = Slot::Cancelled;
        }
    }

    /// Takes the next outcome to hand out, if it has finished.
    pub(crate) fn pop(&mut self) -> Option<Outcome<T, E>> {
        match self {
            OutcomeBuffer::Completion(ready) => ready.pop_front(),
            OutcomeBuffer::Input { next_index, slots } => loop {
                match slots.front()? {
                    Slot::Running => return None,
                    Slot::Finished(_) | Slot::Cancelled => {}
                }
                *next_index += 1;
                if let Some(Slot::Finished(outcome)) = slots.pop_front() {
                    return Some(outcome);
                }
            },
        }
    }
}
