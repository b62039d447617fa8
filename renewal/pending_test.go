package renewal

import (
	"context"
	"log/slog"
	"testing"
	"time"
)

// An answer naming a request the pending one took over from (asked again
// after an answer was lost): a certificate would be taken (it certifies the
// same key), but an error says nothing about the later request the hub
// accepted, so the pending request stays; an answer for a request never
// made is ignored too.
func TestLateErrorForEarlierRequest(t *testing.T) {
	r := New(Deps{Log: slog.New(slog.DiscardHandler), Settings: func() Settings { return Settings{StateDir: t.TempDir()} }})
	p := &pendingIssue{rid: "gwrenew2x1", earlier: []string{"gwrenew1x1"}, deadline: time.Now().Add(time.Hour)}
	r.pending = p
	r.OnCredentials(context.Background(), 500, "gwrenew1x1", []byte(`{"errorCode":500001,"message":"issuance failed"}`))
	r.OnCredentials(context.Background(), 200, "someone-else", []byte(`{"certificates":["AA=="]}`))
	if r.pending != p {
		t.Fatal("an error about an earlier request, or an unknown answer, dropped the pending request")
	}
}
