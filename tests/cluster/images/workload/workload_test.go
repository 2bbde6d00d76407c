package main

import (
	"bytes"
	"encoding/binary"
	"reflect"
	"testing"
)

func TestDNSQueryIsAStandardQueryForA(t *testing.T) {
	msg, err := dnsQuery(0xbeef, "q-client-7.demo.test")
	if err != nil {
		t.Fatal(err)
	}
	want := []byte("\x0aq-client-7\x04demo\x04test\x00\x00\x01\x00\x01")
	if !bytes.Equal(msg[12:], want) {
		t.Fatalf("question %q, want %q", msg[12:], want)
	}
	if id, qd := binary.BigEndian.Uint16(msg), binary.BigEndian.Uint16(msg[4:]); id != 0xbeef || qd != 1 {
		t.Fatalf("id %x qdcount %d", id, qd)
	}
	if _, err := dnsQuery(1, "a..b"); err == nil {
		t.Fatal("an empty label was accepted")
	}
}

func TestDNSAnswerChecksIDAndQR(t *testing.T) {
	resp := []byte{0xbe, 0xef, 0x85, 0x03, 0, 1, 0, 2, 0, 0, 0, 0}
	rcode, answers, err := dnsAnswer(resp, 0xbeef)
	if err != nil || rcode != 3 || answers != 2 {
		t.Fatalf("rcode %d answers %d err %v", rcode, answers, err)
	}
	if _, _, err := dnsAnswer(resp, 0xbeee); err == nil {
		t.Fatal("a foreign ID was accepted")
	}
	resp[2] = 0x01
	if _, _, err := dnsAnswer(resp, 0xbeef); err == nil {
		t.Fatal("a query was taken for an answer")
	}
}

func TestOnlyRunningPodsThatStayAreTargets(t *testing.T) {
	body := []byte(`{"items":[
	 {"metadata":{"name":"a"},"status":{"phase":"Running","podIP":"10.202.0.9"}},
	 {"metadata":{"name":"b"},"status":{"phase":"Pending","podIP":""}},
	 {"metadata":{"name":"c","deletionTimestamp":"2026-01-01T00:00:00Z"},"status":{"phase":"Running","podIP":"10.202.0.3"}},
	 {"metadata":{"name":"d"},"status":{"phase":"Running","podIP":"10.202.0.10"}}]}`)
	ips, err := parsePodIPs(body)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"10.202.0.10", "10.202.0.9"}; !reflect.DeepEqual(ips, want) {
		t.Fatalf("got %v, want %v", ips, want)
	}
}

func TestTargetsGoRoundRobin(t *testing.T) {
	var ts targetSet
	if ts.pick() != "" {
		t.Fatal("an empty set gave a target")
	}
	ts.set([]string{"a", "b"})
	if got := []string{ts.pick(), ts.pick(), ts.pick()}; !reflect.DeepEqual(got, []string{"a", "b", "a"}) {
		t.Fatalf("got %v", got)
	}
}

func TestMarker(t *testing.T) {
	if got := marker("dns-client-0", 12); got != "MSNF dns-client-0 12" {
		t.Fatal(got)
	}
}
