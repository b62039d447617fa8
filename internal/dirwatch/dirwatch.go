// Package dirwatch notices changes in one directory: with inotify, or, when
// that cannot be had, by a scan on a timer instead of going blind. It is
// shared by the agent's config watch and the telemetry pipeline's spool.
//
// Like the other parts of the agent it is handed a logger and a condition
// sink: it says in the log and in a condition (spool-polled, config-polled)
// when it falls back to polling and when inotify is back. It keeps no
// package state; its timer runs on the clock it is given.
package dirwatch

import (
	"log/slog"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/condition"
)

// PollEvery is how often a directory without inotify is scanned.
const PollEvery = 2 * time.Second

// Options say what a Watcher reports to and runs on.
type Options struct {
	// What names the directory in logs and the condition: "spool", "config".
	What string
	// Cond is raised while polling, with the reason inotify failed.
	Cond condition.Name
	Sink condition.Sink
	Log  *slog.Logger
	// Clock times the polling; default clock.Real.
	Clock clock.Clock
	// NewWatcher stands in for fsnotify.NewWatcher in tests: inotify that
	// cannot be had is a fault the kernel gives only when its per-user
	// instance limit is used up, which would break other tests.
	NewWatcher func() (*fsnotify.Watcher, error)
}

// Watcher watches one directory. It uses inotify; when that is not
// available (the per-user limit of inotify instances is reached, which other
// services on a gateway can cause, or the file system has no inotify) it
// falls back to a ticker, raises Options.Cond, and tries to get inotify back
// on every tick. Exactly one of Events and Tick delivers at a time; the other
// is nil. A Watcher belongs to the one goroutine that reads it.
type Watcher struct {
	o     Options
	dir   string
	w     *fsnotify.Watcher
	poll  clock.Ticker
	pollC <-chan time.Time
}

// Watch starts watching dir.
func Watch(dir string, o Options) *Watcher {
	o.Clock = clock.Or(o.Clock)
	if o.NewWatcher == nil {
		o.NewWatcher = fsnotify.NewWatcher
	}
	d := &Watcher{o: o, dir: dir}
	if err := d.watch(); err != nil {
		o.Log.Warn("cannot watch the "+o.What+" directory with inotify; scanning it every "+PollEvery.String()+" instead",
			"dir", dir, "err", err, "hint", "raise fs.inotify.max_user_instances if other services use them all")
		o.Sink.Raise(o.Cond, o.What+" directory "+dir+": "+err.Error())
		d.poll, d.pollC = o.Clock.NewTicker(PollEvery)
	}
	return d
}

// watch replaces the poll timer by an inotify watch, if it can.
func (d *Watcher) watch() error {
	w, err := d.o.NewWatcher()
	if err != nil {
		return err
	}
	if err := w.Add(d.dir); err != nil {
		w.Close()
		return err
	}
	d.w = w
	return nil
}

// Events and Errors are nil while polling.
func (d *Watcher) Events() <-chan fsnotify.Event {
	if d.w == nil {
		return nil
	}
	return d.w.Events
}

func (d *Watcher) Errors() <-chan error {
	if d.w == nil {
		return nil
	}
	return d.w.Errors
}

// Tick delivers while polling: scan the directory, then call Ticked.
func (d *Watcher) Tick() <-chan time.Time { return d.pollC }

// Ticked is called on every poll tick: it tries to get inotify back.
func (d *Watcher) Ticked() {
	if d.watch() != nil {
		return
	}
	d.poll.Stop()
	d.poll, d.pollC = nil, nil
	d.o.Log.Info("watching the "+d.o.What+" directory with inotify again", "dir", d.dir)
	d.o.Sink.Clear(d.o.Cond)
}

// Move watches dir instead of the current directory.
func (d *Watcher) Move(dir string) error {
	if d.w != nil {
		if err := d.w.Add(dir); err != nil {
			return err
		}
		d.w.Remove(d.dir)
	}
	d.dir = dir
	return nil
}

// Close stops watching.
func (d *Watcher) Close() {
	if d.w != nil {
		d.w.Close()
	}
	if d.poll != nil {
		d.poll.Stop()
	}
}

// Sig identifies one version of one file: a new file under a reused name, or
// a file rewritten in place, has another signature. Polling compares them.
type Sig struct {
	Dev, Ino uint64
	Size     int64
	Mtime    int64 // ns
}

// SigOf is the signature of what st describes.
func SigOf(st *syscall.Stat_t) Sig {
	return Sig{Dev: uint64(st.Dev), Ino: st.Ino, Size: st.Size, Mtime: st.Mtim.Nano()}
}
