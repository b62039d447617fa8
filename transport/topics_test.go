package transport

import (
	"net/url"
	"reflect"
	"strings"
	"testing"
)

func TestPropertyBag(t *testing.T) {
	sys := map[string]string{"mid": "m-1", "ct": "application/json", "ce": "utf-8"}
	app := map[string]string{"kind": "health", "a b": "x&y=z"}
	bag := EncodeProperties(sys, app)
	want := "%24.ce=utf-8&%24.ct=application%2Fjson&%24.mid=m-1&a%20b=x%26y%3Dz&kind=health"
	if bag != want {
		t.Fatalf("bag\n got %s\nwant %s", bag, want)
	}
	s2, a2 := DecodeProperties(bag)
	if !reflect.DeepEqual(s2, sys) || !reflect.DeepEqual(a2, app) {
		t.Fatalf("round trip: %v %v", s2, a2)
	}
	// The documented C2D example, with a bare key.
	s3, a3 := DecodeProperties("%24.to=%2Fdevices%2Fd1%2Fmessages%2FdeviceBound&abc=123&flag")
	if s3["to"] != "/devices/d1/messages/deviceBound" || a3["abc"] != "123" || a3["flag"] != "" {
		t.Fatalf("decode: %v %v", s3, a3)
	}
}

// TestPropertyBagRFC3986: the hub decodes a bag like .NET's
// Uri.UnescapeDataString: '+' is a plus, a space must be %20.
func TestPropertyBagRFC3986(t *testing.T) {
	app := map[string]string{"note": "a b+c&d=e/f", "größe": "naïve 東京", "plus+key": "+"}
	bag := EncodeProperties(nil, app)
	if strings.Contains(bag, "+") || strings.Contains(bag, " ") {
		t.Fatalf("bag %q has a raw '+' or space", bag)
	}
	if !strings.Contains(bag, "note=a%20b%2Bc%26d%3De%2Ff") {
		t.Fatalf("bag %q: want space as %%20 and plus as %%2B", bag)
	}
	_, got := DecodeProperties(bag)
	if !reflect.DeepEqual(got, app) {
		t.Fatalf("round trip %v, want %v", got, app)
	}
	// From the hub: '+' is a literal plus.
	_, a := DecodeProperties("k=1+1%20=%202")
	if a["k"] != "1+1 = 2" {
		t.Fatalf("decoded %q, want \"1+1 = 2\"", a["k"])
	}
}

func TestParseStatusTopic(t *testing.T) {
	st, q, ok := parseStatusTopic("$iothub/twin/res/204/?$rid=7&$version=12", twinResPrefix)
	if !ok || st != 204 || q.Get("$rid") != "7" || q.Get("$version") != "12" {
		t.Fatalf("%v %v %v", st, q, ok)
	}
	for _, bad := range []string{"$iothub/twin/res/x/?$rid=1", "$iothub/twin/res/200", "other/200/?a=1"} {
		if _, _, ok := parseStatusTopic(bad, twinResPrefix); ok {
			t.Errorf("accepted %q", bad)
		}
	}
}

// The bag is built in place for speed; every byte must come out as
// url.QueryEscape would render it with a space as %20.
func TestPropertyBagEscapesEveryByte(t *testing.T) {
	for c := 0; c < 256; c++ {
		s := "k" + string([]byte{byte(c)}) + "v"
		want := strings.ReplaceAll(url.QueryEscape(s), "+", "%20")
		if got := string(appendBagEscaped(nil, s)); got != want {
			t.Fatalf("byte %#x: got %q, want %q", c, got, want)
		}
	}
}
