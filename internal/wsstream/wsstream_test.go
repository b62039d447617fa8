package wsstream

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// pair returns a client Conn and runs serve on the server's WebSocket.
func pair(t *testing.T, serve func(ws *websocket.Conn)) *Conn {
	t.Helper()
	up := websocket.Upgrader{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		serve(ws)
	}))
	t.Cleanup(srv.Close)
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	c := New(ws)
	t.Cleanup(func() { c.Close() })
	return c
}

func TestReadAcrossMessages(t *testing.T) {
	c := pair(t, func(ws *websocket.Conn) {
		// One MQTT packet split over three messages, one empty.
		for _, m := range []string{"\x30\x05ab", "", "cde"} {
			ws.WriteMessage(websocket.BinaryMessage, []byte(m))
		}
		ws.WriteMessage(websocket.TextMessage, []byte("text"))
		time.Sleep(time.Second)
	})
	buf := make([]byte, 7)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "\x30\x05abcde" {
		t.Fatalf("read %q, %v", buf, err)
	}
	if _, err := c.Read(buf); err == nil || !strings.Contains(err.Error(), "non-binary") {
		t.Fatalf("a text message must be an error, got %v", err)
	}
}

func TestCloseIsEOF(t *testing.T) {
	c := pair(t, func(ws *websocket.Conn) {
		ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""))
	})
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("got %v, want io.EOF", err)
	}
}

// net.Conn allows deadlines to be set beside writes (mochi and paho do it);
// run under -race.
func TestDeadlinesBesideWrites(t *testing.T) {
	got := make(chan int, 1)
	c := pair(t, func(ws *websocket.Conn) {
		n := 0
		for {
			_, m, err := ws.ReadMessage()
			if err != nil {
				got <- n
				return
			}
			n += len(m)
		}
	})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for range 200 {
			if _, err := c.Write([]byte("0123456789")); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	go func() {
		defer wg.Done()
		for range 200 {
			c.SetDeadline(time.Now().Add(time.Minute))
		}
	}()
	wg.Wait()
	c.Close()
	if n := <-got; n != 2000 {
		t.Fatalf("server got %d bytes, want 2000", n)
	}
}

// A write deadline in the past makes the next Write fail at once.
func TestWriteDeadline(t *testing.T) {
	c := pair(t, func(ws *websocket.Conn) { time.Sleep(time.Second) })
	c.SetWriteDeadline(time.Now().Add(-time.Second))
	if _, err := c.Write([]byte("x")); err == nil {
		t.Fatal("write after the deadline succeeded")
	}
}
