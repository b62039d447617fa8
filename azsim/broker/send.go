package broker

import (
	"fmt"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Send writes one PUBLISH to the client and returns its packet id (QoS 1).
// QoS 1 messages go through the broker's inflight store, so they are resent
// if a persistent session resumes before the PUBACK.
func Send(cl *mqtt.Client, topic string, payload []byte, qos byte) (uint16, error) {
	return SendTracked(cl, topic, payload, qos, nil)
}

// SendTracked is Send that tells track the packet id of a QoS 1 message
// before the message is written: the client's PUBACK can be read (and its
// hook run) before Send returns, so whoever waits for that PUBACK must be
// waiting for it first.
func SendTracked(cl *mqtt.Client, topic string, payload []byte, qos byte, track func(id uint16)) (uint16, error) {
	out := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos},
		TopicName:   topic,
		Payload:     payload,
		Created:     time.Now().Unix(),
	}
	if qos > 0 {
		id, err := cl.NextPacketID()
		if err != nil {
			return 0, fmt.Errorf("send %s: %w", topic, err)
		}
		out.PacketID = uint16(id)
		if cl.State.Inflight.Set(out) {
			cl.State.Inflight.DecreaseSendQuota()
		}
		if track != nil {
			track(out.PacketID)
		}
	}
	if err := cl.WritePacket(out); err != nil {
		return out.PacketID, fmt.Errorf("send %s: %w", topic, err)
	}
	return out.PacketID, nil
}
