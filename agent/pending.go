package agent

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
)

// A hub certificate request the hub accepted (202) may be answered hours
// later (operationExpires), on a later connection or after a restart. The
// request is kept in memory (Agent.pending) and on disk, so that gwagent
// waits for its own request instead of sending a new one that the hub would
// refuse with 409, or that would replace (cancel) the one being issued.

const pendingRecordFile = "renewal-pending.json"

// errOwnRequestPending: the hub is still working on our own request; wait
// for its answer instead of asking again.
var errOwnRequestPending = errors.New("our certificate request is still pending at the hub")

type pendingRecord struct {
	RID      string    `json:"rid"`
	Slot     string    `json:"slot"`   // key URI of the new key
	Serial   string    `json:"serial"` // of the certificate being renewed
	Deadline time.Time `json:"deadline"`
}

// setPending makes p the pending request and, once the hub accepted it
// (deadline set), records it on disk.
func (a *Agent) setPending(p *pendingIssue) {
	a.mu.Lock()
	a.pending = p
	rec := pendingRecord{RID: p.rid, Slot: p.slot.Secret(), Serial: p.id.Serial, Deadline: p.deadline}
	a.mu.Unlock()
	if rec.Deadline.IsZero() {
		return
	}
	b, _ := json.Marshal(rec)
	if err := atomicfile.Write(filepath.Join(a.cfg.Load().StateDir, pendingRecordFile), b, 0o600); err != nil {
		a.log.Warn("cannot record the pending certificate request; after a restart it will be replaced", "err", err)
	}
}

// clearPending forgets p if it is the pending request.
func (a *Agent) clearPending(p *pendingIssue) {
	a.mu.Lock()
	if a.pending != p {
		a.mu.Unlock()
		return
	}
	a.pending = nil
	a.mu.Unlock()
	a.removePendingRecord()
}

func (a *Agent) removePendingRecord() {
	if err := os.Remove(filepath.Join(a.cfg.Load().StateDir, pendingRecordFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn("cannot remove the pending certificate request record", "err", err)
	}
}

// loadPending restores a pending request recorded before a restart, if it
// is for id and still within its wait.
func (a *Agent) loadPending(ctx context.Context, id *provisioning.Identity) {
	path := filepath.Join(a.cfg.Load().StateDir, pendingRecordFile)
	b, err := os.ReadFile(path)
	if err != nil {
		return
	}
	var rec pendingRecord
	if json.Unmarshal(b, &rec) != nil || rec.Serial != id.Serial || !a.opts.Now().Before(rec.Deadline) {
		os.Remove(path)
		return
	}
	slot, err := keystore.Parse(rec.Slot)
	if err != nil {
		os.Remove(path)
		return
	}
	signer, err := a.keys.Signer(ctx, slot)
	if err != nil {
		a.log.Warn("the key of the pending certificate request is gone; a new request will replace it", "err", err)
		os.Remove(path)
		return
	}
	a.mu.Lock()
	if a.pending == nil {
		a.pending = &pendingIssue{slot: slot, signer: signer, id: id, rid: rec.RID, deadline: rec.Deadline}
	}
	a.mu.Unlock()
	a.log.Info("waiting for the certificate request sent before the restart", "rid", rec.RID, "until", rec.Deadline)
}
