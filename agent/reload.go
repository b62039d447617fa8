package agent

import (
	"context"
	"path/filepath"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/internal/dirwatch"
)

// reloadDebounce is how long the config file must stay quiet after a
// change before it is read: an editor's save is several writes.
const reloadDebounce = 300 * time.Millisecond

// watchConfig reloads the config when its file changes (directory watch,
// so atomic replaces are seen; scanned on a timer without inotify),
// debounced; an invalid file is logged and the old config stays.
func (a *Agent) watchConfig(ctx context.Context) {
	path := a.cfg.Load().Path() // a reload never moves the file
	dir, file := filepath.Dir(path), filepath.Base(path)
	w := dirwatch.Watch(dir, dirwatch.Options{What: "config", Cond: CondConfigPolled, Sink: a.status, Log: a.log,
		Clock: a.clock, NewWatcher: a.opts.newWatcher})
	defer w.Close()
	last := configSig(path) // what polling compares with
	debounce, debounceC := a.clock.NewTimer(reloadDebounce)
	debounce.Stop()
	defer debounce.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.Events():
			if !ok {
				return
			}
			if filepath.Base(ev.Name) == file {
				debounce.Reset(reloadDebounce)
			}
		case err := <-w.Errors():
			a.log.Warn("config watcher", "err", err)
		case <-w.Tick():
			w.Ticked()
			if sig := configSig(path); sig != last {
				last = sig
				a.reload()
			}
		case <-debounceC:
			last = configSig(path)
			a.reload()
		}
	}
}

// configSig tells one version of the config file from another without
// reading it (an atomic replace changes the inode, an edit the time or size).
func configSig(path string) dirwatch.Sig {
	var st syscall.Stat_t
	if syscall.Stat(path, &st) != nil {
		return dirwatch.Sig{}
	}
	return dirwatch.SigOf(&st)
}

// reload applies a changed config: telemetry interval, spool directory, log
// level take effect now; identity changes and the outbox bound need a restart.
func (a *Agent) reload() {
	next, err := LoadConfig(a.cfg.Load().Path())
	if err != nil {
		a.log.Error("config change rejected; keeping the running config", "err", err)
		return
	}
	old := a.cfg.Load()
	if next.Identity != old.Identity || next.Onboarding != old.Onboarding || next.Operational != old.Operational ||
		next.Hub != old.Hub || next.StateDir != old.StateDir || next.TrustBundle != old.TrustBundle {
		a.log.Warn("config change affects the device identity or connection; restart gwagent to apply it (systemctl restart gwagent)")
		// Apply what can be applied; keep the identity-related parts.
		next.Identity, next.Onboarding, next.Operational, next.Hub = old.Identity, old.Onboarding, old.Operational, old.Hub
		next.StateDir, next.TrustBundle = old.StateDir, old.TrustBundle
	}
	a.cfg.Store(next)
	a.applyLogLevel(next)
	if next.Telemetry.Interval != old.Telemetry.Interval {
		a.health.SetInterval(next.Telemetry.Interval.Duration)
	}
	if next.Network != old.Network {
		// Reconnect so the next session uses the new transport or proxy.
		a.log.Info("network settings changed; reconnecting", "transport", next.Network.Transport)
		a.hub.endSession()
	}
	a.log.Info("config reloaded", "telemetry_interval", next.Telemetry.Interval.Duration, "spool_dir", next.Telemetry.SpoolDir, "log_level", next.LogLevel)
}

// Config is the configuration in effect (it changes on reload).
func (a *Agent) Config() *Config { return a.cfg.Load() }
