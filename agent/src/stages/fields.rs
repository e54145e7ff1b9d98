//! Extracted fields of the entry being processed: a fixed table of names resolved when the
//! pipeline is compiled, and per-entry values that reuse their buffers from line to line,
//! so extracting a field allocates nothing once a stream is warm.

/// Index of a field name in the pipeline's table.
pub(super) type FieldId = usize;

/// Every field name any stage reads or writes, interned at compile time.
#[derive(Debug, Default)]
pub(super) struct FieldTable {
    names: Vec<String>,
}

impl FieldTable {
    pub(super) fn intern(&mut self, name: &str) -> FieldId {
        match self.lookup(name) {
            Some(id) => id,
            None => {
                self.names.push(name.to_string());
                self.names.len() - 1
            }
        }
    }

    pub(super) fn lookup(&self, name: &str) -> Option<FieldId> {
        self.names.iter().position(|known| known == name)
    }
}

/// One entry's extracted values.
#[derive(Clone, Debug, Default)]
pub(super) struct Fields {
    values: Vec<String>,
    present: Vec<bool>,
    /// The parser's already-parsed value of a time field, so a `timestamp` stage reading
    /// that field in RFC3339 does not parse it twice.
    parsed_time: Option<(FieldId, i64)>,
}

impl Fields {
    pub(super) fn clear(&mut self) {
        self.present.iter_mut().for_each(|p| *p = false);
        self.parsed_time = None;
    }

    pub(super) fn get(&self, id: FieldId) -> Option<&str> {
        match self.present.get(id) {
            Some(true) => self.values.get(id).map(String::as_str),
            _ => None,
        }
    }

    pub(super) fn set(&mut self, id: FieldId, value: &str) {
        if self.values.len() <= id {
            self.values.resize_with(id + 1, String::new);
            self.present.resize(id + 1, false);
        }
        self.values[id].clear();
        self.values[id].push_str(value);
        self.present[id] = true;
        if matches!(self.parsed_time, Some((time, _)) if time == id) {
            self.parsed_time = None;
        }
    }

    pub(super) fn set_time(&mut self, id: FieldId, text: &str, nanos: i64) {
        self.set(id, text);
        self.parsed_time = Some((id, nanos));
    }

    pub(super) fn parsed_time(&self, id: FieldId) -> Option<i64> {
        match self.parsed_time {
            Some((time, nanos)) if time == id => Some(nanos),
            _ => None,
        }
    }

    /// Move a value out (to read it while writing other fields); see [`Fields::restore`].
    pub(super) fn take(&mut self, id: FieldId) -> Option<String> {
        self.get(id)?;
        self.present[id] = false;
        Some(std::mem::take(&mut self.values[id]))
    }

    /// Put back what [`Fields::take`] returned, unless the field was set meanwhile.
    pub(super) fn restore(&mut self, id: FieldId, value: String) {
        if self.get(id).is_none() {
            self.values[id] = value;
            self.present[id] = true;
        }
    }
}
