"""Seed-document messages and frames (003_be5b75d5fb940761.txt) shared by the heating tests."""

GW_ID = "02345678903"
SET_TOPIC = f"hy/gw/set/{GW_ID}"
GET_TOPIC = f"hy/gw/get/{GW_ID}"

# §1.2, as printed: "CSQ":99,99 unquoted.
STATUS_REPORT = (
    '{"gw":{"msg_id":1,"msg_gw_pr":0,"gw_id":"02345678903"},"data":{"stat":2,"CSQ":99,99,'
    '"RSSI":-98,"SINR":13,"CCID":"89860025102250386087","GW_Ver":"V1.0","has_rst":0,'
    '"MBUS_mV":29392,"MBUS_mA":3,"GW_model":136,"main_meter_total":5,"copy_meter_total":96}}'
)
# §2.2, with the leading space and 20XX years.
PERIODS_REPORT = (
    '{ "gw":{"msg_id":2,"msg_gw_pr":0,"gw_id":"02345678903"},"data":{"stat":2,'
    '"not_intimer_interval":1440,"heating_start":"20XX-09-01","heating_end":"20XX-05-01",'
    '"main_interval":10,"copy_interval":60,"copy_statistics":1}}'
)
METER_55 = "27100583203400"
METER_53 = "23227310200800"
# §5.3 line 192 (valid) and §4.1 line 162 (valid).
FRAME_55 = (
    "685527100583001111813B901F0012235304050000000032785634002A8728009328000000000005"
    "000000002C00000000FA00FA000000E803E8030000EA008185CB0123F7407316"
)
FRAME_53 = (
    "685323227310001111812D901F011073221201DC00DC0055640A28006F330000640123012562010235"
    "3005502000B42300081926052420409416"
)
# §3.1 line 153: L right, CS printed 8B, computed 91.
FRAME_53_BAD_CHECKSUM = (
    "685323227310001111812D901F011073221201DC00DC0055640A28006F330000640118011962010506"
    "3005502000B42300412026052420408B16"
)
# §7.2.1 (repaired) and §7.2.3; §8.2.1 and §8.2.3.
VALVE_55_OPEN_50 = "FEFEFE6855271005830011111605902F01F4016E16"
VALVE_55_ACK = "6855271005830011119603902F01F716"
VALVE_53_OPEN_50 = "FEFEFE6853232273100011110404A01900329816"
VALVE_53_REPLY_50 = "6853232273100011118404A01900321816"


def meter_report(meter_id: str, *frames: str, gw_id: str = GW_ID) -> bytes:
    """A msg 20 as the gateway sends it."""
    data = ",".join(f'"{f}"' for f in frames)
    return (
        f'{{"gw":{{"msg_id":20,"msg_gw_pr":0,"gw_id":"{gw_id}"}},'
        f'"data":{{"meter_id":"{meter_id}","meter_data":[{data}]}}}}'
    ).encode()


def stat_reply(msg_id: int, stat: int, gw_id: str = GW_ID) -> bytes:
    return (
        f'{{"gw":{{"msg_id":{msg_id},"msg_gw_pr":0,"gw_id":"{gw_id}"}},"data":{{"stat":{stat}}}}}'
    ).encode()


def transparent_reply(*frames: str, port: int = 0, gw_id: str = GW_ID) -> bytes:
    data = ",".join(f'"{f}"' for f in frames)
    return (
        f'{{"gw":{{"msg_id":40,"msg_gw_pr":0,"gw_id":"{gw_id}"}},'
        f'"data":{{"transparent_port":{port},"meter_data":[{data}]}}}}'
    ).encode()


LAST_WILL = b'{"gw":{"msg_id":70,"msg_gw_pr":0,"gw_id":"02345678903"},"data":{"stat":0}}'
