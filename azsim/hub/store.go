package hub

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

const (
	stateFileName = "hub.json"
	stateVersion  = 1
)

// stateFile is hub.json: everything the hub must remember across restarts.
type stateFile struct {
	Version int                     `json:"version"`
	Devices map[string]*deviceState `json:"devices"`
	CAs     map[string]*caRecord    `json:"cas"`
}

// store writes hub.json atomically: temp file, fsync, rename, fsync dir.
type store struct {
	dir string
}

func openStore(dir string) (*store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory %s: %w (check the --state path and its permissions)", dir, err)
	}
	return &store{dir: dir}, nil
}

func (s *store) path() string { return filepath.Join(s.dir, stateFileName) }

// read returns the saved state, or nil when there is none yet.
func (s *store) read() (*stateFile, error) {
	b, err := os.ReadFile(s.path())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", s.path(), err)
	}
	var st stateFile
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber() // twin values keep their exact numbers
	if err := dec.Decode(&st); err != nil {
		return nil, fmt.Errorf("parse %s: %w (the file is damaged; restore it or move it away to start with an empty hub)", s.path(), err)
	}
	if st.Version != stateVersion {
		return nil, fmt.Errorf("parse %s: state version %d, this azsim understands %d; use a matching azsim or move the file away", s.path(), st.Version, stateVersion)
	}
	return &st, nil
}

func (s *store) write(b []byte) error {
	return writeFileAtomic(s.path(), b, 0o600)
}

// writeFileAtomic replaces path with data so that a crash leaves either the
// old or the new content, never a mix.
func writeFileAtomic(path string, data []byte, perm os.FileMode) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = f.Chmod(perm); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("write %s: fsync: %w", path, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("write %s: open directory for fsync: %w", path, err)
	}
	defer d.Close()
	if err = d.Sync(); err != nil {
		return fmt.Errorf("write %s: fsync directory: %w", path, err)
	}
	return nil
}

// load fills the registry from disk (called from New, before any traffic).
func (h *Hub) load() error {
	st, err := h.store.read()
	if err != nil || st == nil {
		return err
	}
	for id, ds := range st.Devices {
		if ds == nil || ds.ID != id {
			return fmt.Errorf("parse %s: device entry %q is inconsistent; fix or remove it", h.store.path(), id)
		}
		ds.Twin.normalize()
		h.devices[id] = &device{deviceState: *ds}
	}
	for name, ca := range st.CAs {
		if ca == nil {
			continue
		}
		if err := ca.parse(); err != nil {
			return fmt.Errorf("parse %s: CA %q: %w", h.store.path(), name, err)
		}
		h.cas[name] = ca
	}
	return nil
}

// persist writes a snapshot of the current state. It must be called without
// h.mu held; saveMu orders snapshots so the file always ends up with the
// newest one.
func (h *Hub) persist() error {
	if h.store == nil {
		return nil
	}
	h.saveMu.Lock()
	defer h.saveMu.Unlock()
	h.mu.Lock()
	st := stateFile{Version: stateVersion, Devices: map[string]*deviceState{}, CAs: map[string]*caRecord{}}
	for id, d := range h.devices {
		ds := d.deviceState
		st.Devices[id] = &ds
	}
	for name, ca := range h.cas {
		st.CAs[name] = ca
	}
	b, err := json.MarshalIndent(st, "", "  ")
	h.mu.Unlock()
	if err != nil {
		return fmt.Errorf("save hub state: %w", err)
	}
	if err := h.store.write(b); err != nil {
		return fmt.Errorf("save hub state: %w (check free space and permissions of the state directory)", err)
	}
	return nil
}
