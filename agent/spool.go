package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/gwagent/gwagent/transport"
)

// spoolLoop watches the spool directory for *.json files from local
// applications and queues each as one message; the file is deleted after
// the hub's PUBACK (drain). Writers should write a temporary name (starting
// with '.' or not ending in .json) and rename it into place.
func (a *Agent) spoolLoop(ctx context.Context) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		a.log.Error("spool watcher", "err", err)
		return
	}
	defer w.Close()
	dir := a.cfg.Load().Telemetry.SpoolDir
	if err := w.Add(dir); err != nil {
		a.log.Error("cannot watch spool directory", "dir", dir, "err", err)
		return
	}
	queued := a.queuedSpoolFiles()
	a.scanSpool(dir, queued)
	retry := time.NewTicker(30 * time.Second) // picks up files refused while the outbox was full
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.Events:
			if !ok {
				return
			}
			if ev.Op&(fsnotify.Create|fsnotify.Write) != 0 {
				a.spoolFile(ev.Name, queued)
			}
		case err := <-w.Errors:
			a.log.Warn("spool watcher", "err", err)
		case <-retry.C:
			if nd := a.cfg.Load().Telemetry.SpoolDir; nd != dir {
				w.Remove(dir)
				if err := w.Add(nd); err != nil {
					a.log.Error("cannot watch new spool directory", "dir", nd, "err", err)
				} else {
					a.log.Info("spool directory changed", "from", dir, "to", nd)
					dir = nd
				}
			}
			a.scanSpool(dir, queued)
		}
	}
}

// queuedSpoolFiles lists spool files already in the outbox (queued before a
// restart), so they are not queued twice.
func (a *Agent) queuedSpoolFiles() map[string]bool {
	out := map[string]bool{}
	var last uint64
	for {
		ms, err := a.outbox.Next(last, 256)
		if err != nil || len(ms) == 0 {
			return out
		}
		for _, m := range ms {
			if m.Local != "" {
				out[m.Local] = true
			}
			last = m.Seq
		}
	}
}

func (a *Agent) scanSpool(dir string, queued map[string]bool) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		a.log.Warn("spool directory", "err", err)
		return
	}
	for _, e := range ents {
		a.spoolFile(filepath.Join(dir, e.Name()), queued)
	}
}

func (a *Agent) spoolFile(path string, queued map[string]bool) {
	name := filepath.Base(path)
	if strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".json") || queued[path] {
		return
	}
	body, err := os.ReadFile(path)
	if err != nil {
		return // gone already, or still being written: the rename will tell us again
	}
	if !json.Valid(body) {
		a.log.Warn("spool file is not JSON; left in place", "file", path)
		return
	}
	// The id is a digest of name and content: if the agent dies after the
	// PUBACK but before deleting the file, the copy sent again carries the
	// same id and the cloud can drop it.
	sum := sha256.Sum256(append([]byte(name+"\x00"), body...))
	err = a.enqueue(&transport.Message{Kind: transport.KindApp, Body: body, Local: path, ID: "spool-" + hex.EncodeToString(sum[:12]),
		System: map[string]string{"ct": "application/json", "ce": "utf-8"}})
	if err != nil {
		a.log.Error("application message not queued; it stays in the spool directory", "file", path, "err", err)
		return
	}
	a.log.Debug("spool file queued", "file", path)
	queued[path] = true
}
