package agent

import (
	"time"

	"github.com/fsnotify/fsnotify"
)

// CondSpoolPolled and CondConfigPolled: a directory the agent must notice
// changes in could not be watched with inotify, so it is scanned on a timer
// instead. Spool files and config changes are still picked up, a little later.
const (
	CondSpoolPolled  Condition = "spool-polled"
	CondConfigPolled Condition = "config-polled"
)

// watchPollEvery is how often a directory without inotify is scanned.
const watchPollEvery = 2 * time.Second

// dirWatcher notices changes in one directory. It uses inotify; when that is
// not available (the per-user limit of inotify instances is reached, which
// other services on a gateway can cause, or the file system has no inotify)
// it falls back to a timer instead of going blind, raises CondWatchPolling,
// and tries to get inotify back on every tick. Exactly one of events and
// tick delivers at a time; the other is nil.
type dirWatcher struct {
	a    *Agent
	what string // "spool" or "config", for logs
	cond Condition
	dir  string
	w    *fsnotify.Watcher
	poll *time.Ticker
}

func (a *Agent) watchDir(what string, cond Condition, dir string) *dirWatcher {
	d := &dirWatcher{a: a, what: what, cond: cond, dir: dir}
	if err := d.watch(); err != nil {
		d.a.log.Warn("cannot watch the "+what+" directory with inotify; scanning it every "+watchPollEvery.String()+" instead",
			"dir", dir, "err", err, "hint", "raise fs.inotify.max_user_instances if other services use them all")
		d.a.status.Raise(d.cond, what+" directory "+dir+": "+err.Error())
		d.poll = time.NewTicker(watchPollEvery)
	}
	return d
}

// watch replaces the poll timer by an inotify watch, if it can.
func (d *dirWatcher) watch() error {
	newWatcher := fsnotify.NewWatcher
	if d.a.opts.newWatcher != nil {
		newWatcher = d.a.opts.newWatcher
	}
	w, err := newWatcher()
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

// events and errs are nil while polling; tick is nil while watching.
func (d *dirWatcher) events() <-chan fsnotify.Event {
	if d.w == nil {
		return nil
	}
	return d.w.Events
}

func (d *dirWatcher) errs() <-chan error {
	if d.w == nil {
		return nil
	}
	return d.w.Errors
}

func (d *dirWatcher) tick() <-chan time.Time {
	if d.poll == nil {
		return nil
	}
	return d.poll.C
}

// ticked is called on every poll tick: it tries to get inotify back.
func (d *dirWatcher) ticked() {
	if d.watch() != nil {
		return
	}
	d.poll.Stop()
	d.poll = nil
	d.a.log.Info("watching the "+d.what+" directory with inotify again", "dir", d.dir)
	d.a.status.Clear(d.cond)
}

// move watches dir instead of the current directory.
func (d *dirWatcher) move(dir string) error {
	if d.w != nil {
		if err := d.w.Add(dir); err != nil {
			return err
		}
		d.w.Remove(d.dir)
	}
	d.dir = dir
	return nil
}

func (d *dirWatcher) close() {
	if d.w != nil {
		d.w.Close()
	}
	if d.poll != nil {
		d.poll.Stop()
	}
}
