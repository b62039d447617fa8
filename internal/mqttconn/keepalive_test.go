package mqttconn

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/gwagent/gwagent/internal/clock"
)

// connectPacket is the CONNECT paho writes once Configure has turned its
// pinger off: keep-alive 0.
func connectPacket(t *testing.T, version byte) []byte {
	t.Helper()
	cp := packets.NewControlPacket(packets.Connect).(*packets.ConnectPacket)
	cp.ProtocolName = "MQTT"
	if version == 3 {
		cp.ProtocolName = "MQIsdp"
	}
	cp.ProtocolVersion = version
	cp.ClientIdentifier = "dev-1"
	cp.UsernameFlag, cp.Username = true, "hub.example/dev-1/?api-version=2021-04-12"
	var b bytes.Buffer
	if err := cp.Write(&b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// peer is the server's end of a keeper's connection: it reads packets
// as the broker would.
type peer struct {
	t       *testing.T
	c       net.Conn
	packets chan packets.ControlPacket
}

func newPeer(t *testing.T, c net.Conn) *peer {
	p := &peer{t: t, c: c, packets: make(chan packets.ControlPacket, 64)}
	go func() {
		defer close(p.packets)
		for {
			cp, err := packets.ReadPacket(c)
			if err != nil {
				return
			}
			p.packets <- cp
		}
	}()
	return p
}

func (p *peer) next() packets.ControlPacket {
	p.t.Helper()
	select {
	case cp := <-p.packets:
		return cp
	case <-time.After(5 * time.Second):
		p.t.Fatal("the peer received nothing")
		return nil
	}
}

// none fails if the peer receives a packet within a moment.
func (p *peer) none(why string) {
	p.t.Helper()
	select {
	case cp := <-p.packets:
		p.t.Fatalf("%s: the peer received %s", why, cp)
	case <-time.After(50 * time.Millisecond):
	}
}

// The CONNECT paho writes with keep-alive 0 reaches the server with the
// configured keep-alive, in MQTT 3.1.1 and 3.1 alike; anything else as the
// first packet is refused rather than sent on.
func TestKeeperConnectCarriesKeepAlive(t *testing.T) {
	for _, version := range []byte{4, 3} {
		a, b := net.Pipe()
		k := keepAlive(a, clock.NewFake(time.Unix(0, 0)), 240*time.Second, time.Second)
		p := newPeer(t, b)
		if _, err := k.Write(connectPacket(t, version)); err != nil {
			t.Fatal(err)
		}
		cp, ok := p.next().(*packets.ConnectPacket)
		if !ok {
			t.Fatal("the first packet is not a CONNECT")
		}
		if cp.Keepalive != 240 || cp.ProtocolVersion != version || cp.ClientIdentifier != "dev-1" || cp.Username != "hub.example/dev-1/?api-version=2021-04-12" {
			t.Fatalf("MQTT %d: CONNECT arrived as keep-alive %d, version %d, client %q, user %q", version, cp.Keepalive, cp.ProtocolVersion, cp.ClientIdentifier, cp.Username)
		}
		k.Close()
		b.Close()
	}
	a, b := net.Pipe()
	defer b.Close()
	go io.Copy(io.Discard, b) // a packet wrongly passed on must not block the test
	k := keepAlive(a, nil, 240*time.Second, time.Second)
	defer k.Close()
	for _, first := range [][]byte{{0x30, 2, 0, 0}, {0x10}, {0x10, 0x80, 0x80, 0x80, 0x80, 0x01},
		// A remaining length of five bytes, with a CONNECT's body after it.
		{0x10, 0x80, 0x80, 0x80, 0x80, 0x01, 0, 4, 'M', 'Q', 'T', 'T', 4, 2, 0, 0},
		connectPacket(t, 4)[:9]} {
		if _, err := k.Write(first); err == nil {
			t.Fatalf("% x was written as a CONNECT", first)
		}
	}
}

// connected is a keeper on a fake clock whose CONNECT reached the peer;
// b is the peer's end of the connection.
func connected(t *testing.T, every, wait time.Duration) (*clock.Fake, *keeper, net.Conn, *peer) {
	t.Helper()
	fc := clock.NewFake(time.Unix(0, 0))
	a, b := net.Pipe()
	t.Cleanup(func() { b.Close() })
	k := keepAlive(a, fc, every, wait)
	t.Cleanup(func() { k.Close() })
	p := newPeer(t, b)
	if _, err := k.Write(connectPacket(t, 4)); err != nil {
		t.Fatal(err)
	}
	p.next()
	return fc, k, b, p
}

// armed waits until the keeper's check is armed: it finished the last one.
func armed(t *testing.T, fc *clock.Fake) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := fc.BlockUntil(ctx, 1); err != nil {
		t.Fatal("the keeper armed no check")
	}
}

// A connection in use is never pinged; a quiet one is, after between three
// quarters of the keep-alive and the keep-alive, whether nothing went out
// or nothing came in; an answer keeps the connection.
func TestKeeperPingsOnlyWhenQuiet(t *testing.T) {
	const every = 240 * time.Second
	look := every / 4
	fc, k, b, p := connected(t, every, 200*time.Millisecond)
	// advance moves the clock a look on, once the keeper has finished its
	// last check (its one timer is armed again).
	advance := func() {
		t.Helper()
		armed(t, fc)
		fc.Advance(look)
		armed(t, fc)
	}
	// What paho's reader gets.
	read := make(chan error, 1)
	got := make(chan byte, 64)
	go func() {
		for {
			buf := make([]byte, 2)
			if _, err := io.ReadFull(k, buf); err != nil {
				read <- err
				return
			}
			got <- buf[0]
		}
	}()
	pingresp := []byte{0xd0, 0}
	puback := []byte{0x40, 2, 0, 1}
	publish := []byte{0x30, 3, 0, 1, 'x'}

	// A message and its PUBACK every look, for four keep-alives: no ping.
	for i := 0; i < 16; i++ {
		k.Write(publish)
		p.next()
		b.Write(puback[:2])
		b.Write(puback[2:])
		<-got
		<-got
		advance()
		p.none("traffic every look")
	}
	// Sending but hearing nothing (QoS 0 going out, nothing back): pinged
	// within the keep-alive of the last thing read.
	for i := 1; i <= 4; i++ {
		k.Write(publish)
		p.next()
		advance()
		if i < 3 {
			p.none("only " + (time.Duration(i) * look).String() + " without a read")
			continue
		}
		if _, ok := p.next().(*packets.PingreqPacket); !ok {
			t.Fatalf("no PINGREQ after %s without a read", time.Duration(i)*look)
		}
		b.Write(pingresp)
		if c := <-got; c != 0xd0 {
			t.Fatalf("the reader got %x, not the PINGRESP", c)
		}
		break
	}
	// The answer cleared the ping's deadline: a read that waits longer
	// than the ping timeout is not cut short.
	time.Sleep(400 * time.Millisecond)
	select {
	case err := <-read:
		t.Fatalf("the answered ping's deadline ended the read: %v", err)
	default:
	}
	// Nothing at all: pinged after between three looks and four.
	for i := 1; i <= 4; i++ {
		advance()
		if i < 3 {
			p.none("quiet for " + (time.Duration(i) * look).String())
			continue
		}
		if _, ok := p.next().(*packets.PingreqPacket); !ok {
			t.Fatalf("no PINGREQ after %s of quiet", time.Duration(i)*look)
		}
		b.Write(pingresp)
		<-got
		break
	}
	select {
	case err := <-read:
		t.Fatalf("the reader failed: %v", err)
	default:
	}
}

// A ping that gets no answer within the ping timeout fails paho's reader,
// so the connection is lost as it was with paho's pinger.
func TestKeeperUnansweredPingDropsTheConnection(t *testing.T) {
	const every = 60 * time.Second
	fc, k, _, p := connected(t, every, 300*time.Millisecond)
	read := make(chan error, 1)
	go func() {
		_, err := k.Read(make([]byte, 1))
		read <- err
	}()
	for i := 0; i < 3; i++ {
		armed(t, fc)
		fc.Advance(every / 4)
	}
	if _, ok := p.next().(*packets.PingreqPacket); !ok {
		t.Fatal("no PINGREQ")
	}
	t0 := time.Now()
	select {
	case err := <-read:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("the reader failed with %v, not the ping's deadline", err)
		}
		if waited := time.Since(t0); waited > 2*time.Second {
			t.Fatalf("the reader failed %s after the ping", waited)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("an unanswered ping left the connection up")
	}
}
