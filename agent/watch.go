package agent

import (
	"github.com/gwagent/gwagent/internal/dirwatch"
	"github.com/gwagent/gwagent/telemetry"
)

// CondSpoolPolled and CondConfigPolled: a directory the agent must notice
// changes in could not be watched with inotify, so it is scanned on a timer
// instead. Spool files and config changes are still picked up, a little later.
const (
	CondSpoolPolled  Condition = telemetry.CondSpoolPolled
	CondConfigPolled Condition = "config-polled"
)

// watchDir watches one of the agent's own directories (the config's).
func (a *Agent) watchDir(what string, cond Condition, dir string) *dirwatch.Watcher {
	return dirwatch.Watch(dir, dirwatch.Options{What: what, Cond: cond, Sink: a.status, Log: a.log, NewWatcher: a.opts.newWatcher})
}
