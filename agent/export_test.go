package agent

import "github.com/fsnotify/fsnotify"

// WithoutInotify makes the agent's directory watchers fail to start, as they
// do when the kernel's per-user inotify instance limit is used up.
func WithoutInotify(opts *Options, err error) {
	opts.newWatcher = func() (*fsnotify.Watcher, error) { return nil, err }
}

// RetrySentNow lets the next delivered spool file try sent/ again at once
// instead of after sentRetry.
func (a *Agent) RetrySentNow() {
	a.sent.mu.Lock()
	a.sent.tried = a.sent.tried.Add(-sentRetry)
	a.sent.mu.Unlock()
}
