package renewal

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
)

// A hub certificate request the hub accepted (202) may be answered hours
// later (operationExpires), on a later connection or after a restart. The
// request is kept in memory (Renewer.pending) and on disk, so that gwagent
// waits for its own request instead of sending a new one that the hub would
// refuse with 409, or that would replace (cancel) the one being issued.

// PendingFile is the record of that request in the state directory.
const PendingFile = "renewal-pending.json"

// errOwnRequestPending: the hub is still working on our own request; wait
// for its answer instead of asking again.
var errOwnRequestPending = errors.New("our certificate request is still pending at the hub")

// pendingIssue is a hub certificate request whose answer may arrive after a
// reconnect.
type pendingIssue struct {
	slot   *keystore.URI
	signer crypto.Signer
	id     *provisioning.Identity
	// rid and deadline (the end of the wait for the answer after the 202)
	// are set under Renewer.mu, as are the two below.
	rid      string
	deadline time.Time
	// earlier are the rids of requests for the same key that this one
	// took over from (asked again after an answer was lost): a late
	// answer to one of them certifies the same key, so it is taken too.
	earlier []string
	// askAt, if set, is when to ask the hub again whether it still works
	// on the request: the answer has not come that long after a reconnect
	// (see answerGrace in hub.go).
	askAt time.Time
}

// knows reports whether rid names this request or one it took over from.
// The caller holds Renewer.mu.
func (p *pendingIssue) knows(rid string) bool {
	return rid != "" && (rid == p.rid || slices.Contains(p.earlier, rid))
}

type pendingRecord struct {
	RID      string    `json:"rid"`
	Slot     string    `json:"slot"`   // key URI of the new key
	Serial   string    `json:"serial"` // of the certificate being renewed
	Deadline time.Time `json:"deadline"`
}

func (r *Renewer) pendingPath() string {
	return filepath.Join(r.d.Settings().StateDir, PendingFile)
}

// setPending makes p the pending request and, once the hub accepted it
// (deadline set), records it on disk.
func (r *Renewer) setPending(p *pendingIssue) {
	r.mu.Lock()
	r.pending = p
	rec := pendingRecord{RID: p.rid, Slot: p.slot.Secret(), Serial: p.id.Serial, Deadline: p.deadline}
	r.mu.Unlock()
	if rec.Deadline.IsZero() {
		return
	}
	b, _ := json.Marshal(rec)
	if err := atomicfile.Write(r.pendingPath(), b, 0o600); err != nil {
		r.log.Warn("cannot record the pending certificate request; after a restart it will be replaced", "err", err)
	}
}

// clearPending forgets p if it is the pending request.
func (r *Renewer) clearPending(p *pendingIssue) {
	r.mu.Lock()
	if r.pending != p {
		r.mu.Unlock()
		return
	}
	r.pending = nil
	r.mu.Unlock()
	r.removePendingRecord()
}

func (r *Renewer) removePendingRecord() {
	if err := os.Remove(r.pendingPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		r.log.Warn("cannot remove the pending certificate request record", "err", err)
	}
}

// loadPending restores a pending request recorded before a restart, if it
// is for id and still within its wait.
func (r *Renewer) loadPending(ctx context.Context, id *provisioning.Identity) {
	path := r.pendingPath()
	b, err := os.ReadFile(path)
	if err != nil {
		return
	}
	var rec pendingRecord
	if json.Unmarshal(b, &rec) != nil || rec.Serial != id.Serial || !r.clock.Now().Before(rec.Deadline) {
		os.Remove(path)
		return
	}
	slot, err := keystore.Parse(rec.Slot)
	if err != nil {
		os.Remove(path)
		return
	}
	signer, err := r.d.Keys.Signer(ctx, slot)
	if err != nil {
		r.log.Warn("the key of the pending certificate request is gone; a new request will replace it", "err", err)
		os.Remove(path)
		return
	}
	r.mu.Lock()
	if r.pending == nil {
		r.pending = &pendingIssue{slot: slot, signer: signer, id: id, rid: rec.RID, deadline: rec.Deadline}
	}
	r.mu.Unlock()
	r.log.Info("waiting for the certificate request sent before the restart", "rid", rec.RID, "until", rec.Deadline)
}
